"""LongBench evaluation: prompts, middle truncation, resumable greedy prediction and scoring.

The protocol follows the LongBench authors' ``pred.py``/``eval.py`` so that numbers compare with published ones:
per-task prompt templates and generation lengths, prompts longer than the budget keep their first and last halves
(the instructions sit at both ends), the chat template is skipped for the few-shot and code tasks, greedy decoding,
and samsum also stops at a newline. Predictions are appended one JSON line per sample and flushed, so an
interrupted run resumes where it stopped.

Command line::

    python -m duo_attn.eval.longbench predict --model smollm2 --data-dir LongBench/data --tasks hotpotqa,trec \\
        --out runs/longbench [--max-length 7500] [--pattern DIR --sparsity 0.5]
    python -m duo_attn.eval.longbench score --out runs/longbench [--buckets]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models import DTYPES, SMOLLM2, load_model, resolve_dtype
from ..patch import enable_duo_attention_eval
from ..patterns import atomic_write_text
from .harness import encode_prompt, generate_greedy, has_chat_template
from .metrics import base_task, score_task, score_task_by_length

LONGBENCH_TASKS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
    "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
    "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)  # fmt: skip
LONGBENCH_E_TASKS: tuple[str, ...] = tuple(
    f"{task}_e"
    for task in (
        "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
        "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    )
)  # fmt: skip

_QA_MULTIDOC = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)

# LongBench's dataset2prompt: these strings are the benchmark's inputs, so they must match its prompts exactly.
TASK_PROMPTS: dict[str, str] = {
    # "asconcisely" is LongBench's spelling, kept so that prompts are token-identical.
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
    "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
    "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
    "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
    "a single phrase or sentence if possible. If the question cannot be answered based on the information in the "
    'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do '
    "not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
    "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based "
    'on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", '
    '"no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
    "question based on the above text, only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
    "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _QA_MULTIDOC,
    "2wikimqa": _QA_MULTIDOC,
    "musique": _QA_MULTIDOC,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
    "问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
    "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
    "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
    "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
    "\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n"
    "{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
    "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
    "{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
    "carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. "
    "In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
    "count of unique paragraphs after removing duplicates. The output format should only contain the number, such "
    "as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
    "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
    'number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
    '"Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
    '下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench's dataset2maxlen: new-token budget per task.
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip

# Few-shot and code-completion prompts are continuations; LongBench feeds them raw even to chat models.
NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

RESULT_JSON = "result.json"
RESULT_MD = "result.md"


def _task_key(task: str) -> str:
    key = base_task(task)
    if key not in TASK_PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(LONGBENCH_TASKS)} (and *_e variants)")
    return key


def load_task(task: str, data_dir: str | os.PathLike | None = None, *, from_hub: bool = False) -> list[dict]:
    """Samples of one task from ``<data_dir>/<task>.jsonl`` (LongBench's release files), or from the hub on request.

    The hub is only contacted with ``from_hub=True`` (``datasets.load_dataset("THUDM/LongBench", task)``).
    """
    _task_key(task)
    if data_dir is not None:
        path = Path(data_dir) / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no LongBench file for task {task!r}: {path}")
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if not from_hub:
        raise ValueError("give data_dir (a directory of LongBench jsonl files) or from_hub=True")
    from datasets import load_dataset

    return [dict(row) for row in load_dataset("THUDM/LongBench", task, split="test")]


def build_prompt_ids(task: str, sample: dict, tokenizer: Any, max_length: int) -> list[int]:
    """Prompt ids for one sample: template filled, middle-truncated to ``max_length`` tokens, chat-wrapped if due.

    Truncation works like LongBench's: the filled prompt is tokenised, and when too long the decoded first and last
    ``max_length // 2`` tokens are joined; the chat template (when used) is applied afterwards, so it is not counted.
    """
    key = _task_key(task)
    prompt = TASK_PROMPTS[key].format(context=sample.get("context", ""), input=sample.get("input", ""))
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) > max_length:
        half = max_length // 2
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[-half:], skip_special_tokens=True
        )
    chat = has_chat_template(tokenizer) and key not in NO_CHAT_TEMPLATE_TASKS
    return encode_prompt(tokenizer, prompt, chat=chat)


def _sample_id(sample: dict, index: int) -> str:
    """LongBench's ``_id``; samples without one (hand-made files) are keyed by their position."""
    return str(sample["_id"]) if sample.get("_id") is not None else f"#{index}"


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Complete records of a prediction file; a torn last line (killed mid-write) is dropped from the file too."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    records, kept = [], []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
        kept.append(line)
    clean = "".join(f"{line}\n" for line in kept)
    if clean != text:
        atomic_write_text(path, clean)
    return records


def predict_task(
    model: Any,
    tokenizer: Any,
    task: str,
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    max_length: int,
    chunk_size: int | None = None,
    limit: int | None = None,
) -> Path:
    """Predict every sample of ``task`` not yet in ``<out_dir>/<task>.jsonl``; returns that file.

    Each finished sample is appended as ``{pred, answers, all_classes, length, _id}`` and flushed at once, so a killed
    run loses at most the sample in flight and a rerun skips everything already written.
    """
    key = _task_key(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.jsonl"
    done = {str(record.get("_id")) for record in read_predictions(path)}
    todo = [(i, s) for i, s in enumerate(samples) if limit is None or i < limit]
    todo = [(i, s) for i, s in todo if _sample_id(s, i) not in done]
    with path.open("a", encoding="utf-8") as handle:
        for index, sample in tqdm(todo, desc=task, unit="sample"):
            ids = build_prompt_ids(task, sample, tokenizer, max_length)
            pred = generate_greedy(
                model,
                tokenizer,
                ids,
                TASK_MAX_NEW_TOKENS[key],
                stop_at_newline=key == "samsum",
                chunk_size=chunk_size,
            )
            record = {
                "pred": pred,
                "answers": sample["answers"],
                "all_classes": sample.get("all_classes"),
                "length": sample.get("length"),
                "_id": _sample_id(sample, index),
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
    return path


def predict(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    max_length: int,
    data_dir: str | os.PathLike | None = None,
    from_hub: bool = False,
    chunk_size: int | None = None,
    limit: int | None = None,
) -> list[Path]:
    """Run :func:`predict_task` over several tasks (resumable, one output file per task)."""
    model.eval()
    return [
        predict_task(
            model,
            tokenizer,
            task,
            load_task(task, data_dir, from_hub=from_hub),
            out_dir,
            max_length=max_length,
            chunk_size=chunk_size,
            limit=limit,
        )
        for task in tasks
    ]


def score_predictions(
    out_dir: str | os.PathLike, tasks: Sequence[str] | None = None, *, length_buckets: bool = False
) -> dict[str, Any]:
    """Score the prediction files in ``out_dir``; writes ``result.json`` and ``result.md`` there and returns the dict.

    Result keys: ``scores`` (task -> LongBench score, 0-100), ``average`` (unweighted mean over tasks),
    ``n_samples`` (task -> count) and, with ``length_buckets``, ``length_buckets`` (task -> 0-4k/4-8k/8k+ scores).
    Without ``tasks``, every ``<task>.jsonl`` of a known task in ``out_dir`` is scored.
    """
    out = Path(out_dir)
    if tasks is None:
        known = set(LONGBENCH_TASKS) | set(LONGBENCH_E_TASKS)
        tasks = sorted(p.stem for p in out.glob("*.jsonl") if p.stem in known)
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    buckets: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        records = read_predictions(out / f"{task}.jsonl")
        if not records:
            raise FileNotFoundError(f"no predictions for {task} in {out}")
        preds = [r["pred"] for r in records]
        answers = [r["answers"] for r in records]
        classes = [r.get("all_classes") for r in records]
        scores[task] = score_task(task, preds, answers, classes)
        counts[task] = len(records)
        if length_buckets:
            lengths = [int(r.get("length") or 0) for r in records]
            buckets[task] = score_task_by_length(task, preds, answers, lengths, classes)
    if not scores:
        raise FileNotFoundError(f"no LongBench prediction files in {out}")
    result: dict[str, Any] = {
        "scores": scores,
        "average": round(sum(scores.values()) / len(scores), 2),
        "n_samples": counts,
    }
    if length_buckets:
        result["length_buckets"] = buckets
    atomic_write_text(out / RESULT_JSON, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / RESULT_MD, format_markdown(result))
    return result


def format_markdown(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`score_predictions` result, one row per task plus the average."""
    bucket_names = ["0-4k", "4-8k", "8k+"] if "length_buckets" in result else []
    header = ["task", "score", "n", *bucket_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, score in result["scores"].items():
        cells = [task, f"{score:.2f}", str(result["n_samples"][task])]
        for name in bucket_names:
            value = result["length_buckets"][task][name]
            cells.append("-" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    average = ["**average**", f"**{result['average']:.2f}**", "", *([""] * len(bucket_names))]
    lines.append("| " + " | ".join(average) + " |")
    return "\n".join(lines) + "\n"


def _parse_tasks(value: str) -> list[str]:
    if value == "all":
        return list(LONGBENCH_TASKS)
    if value == "all_e":
        return list(LONGBENCH_E_TASKS)
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    for task in tasks:
        _task_key(task)
    return tasks


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn longbench", description="LongBench prediction and scoring (resumable)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pred = sub.add_parser("predict", help="generate predictions (skips samples already in the output), then score")
    pred.add_argument("--model", default=SMOLLM2, help="name or path understood by duo_attn.models.load_model")
    pred.add_argument("--data-dir", help="directory of LongBench <task>.jsonl files")
    pred.add_argument("--from-hub", action="store_true", help="load THUDM/LongBench through `datasets` instead")
    pred.add_argument("--tasks", default="all", help="comma-separated tasks, 'all' (21 tasks) or 'all_e' (LongBench-E)")
    pred.add_argument("--out", required=True, help="output directory (one <task>.jsonl per task)")
    pred.add_argument(
        "--max-length", type=int, help="prompt token budget (default: max_position_embeddings - 500, as LongBench)"
    )
    pred.add_argument("--limit", type=int, help="only the first N samples of each task")
    pred.add_argument("--chunk-size", type=int, help="prefill the prompt in chunks of this many tokens")
    pred.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    pred.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pred.add_argument("--pattern", help="DuoAttention pattern directory; enables the duo KV cache")
    pred.add_argument(
        "--sparsity",
        type=float,
        help="fraction of KV heads made streaming (with --pattern; default: the pattern's gate threshold)",
    )
    pred.add_argument("--buckets", action="store_true", help="also report 0-4k/4-8k/8k+ length buckets")

    score = sub.add_parser("score", help="score the prediction files in an output directory")
    score.add_argument("--out", required=True, help="directory holding <task>.jsonl predictions")
    score.add_argument("--tasks", help="comma-separated tasks (default: every prediction file found)")
    score.add_argument("--buckets", action="store_true", help="also report 0-4k/4-8k/8k+ length buckets")
    return parser


def _run_predict(args: argparse.Namespace) -> None:
    if args.data_dir is None and not args.from_hub:
        raise SystemExit("give --data-dir DIR (LongBench jsonl files) or --from-hub")
    if args.sparsity is not None and args.pattern is None:
        raise SystemExit("--sparsity needs --pattern")
    tasks = _parse_tasks(args.tasks)
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    if args.pattern is not None:
        enable_duo_attention_eval(model, args.pattern, sparsity=args.sparsity)
    max_length = args.max_length or model.config.max_position_embeddings - 500
    predict(
        model,
        tokenizer,
        tasks,
        args.out,
        max_length=max_length,
        data_dir=args.data_dir,
        from_hub=args.from_hub,
        chunk_size=args.chunk_size,
        limit=args.limit,
    )
    print(format_markdown(score_predictions(args.out, tasks, length_buckets=args.buckets)), end="")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m duo_attn.eval.longbench``."""
    args = _build_parser().parse_args(argv)
    if args.command == "predict":
        _run_predict(args)
    else:
        tasks = _parse_tasks(args.tasks) if args.tasks else None
        print(format_markdown(score_predictions(args.out, tasks, length_buckets=args.buckets)), end="")


if __name__ == "__main__":
    main()
