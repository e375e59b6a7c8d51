"""LongBench pipeline on a tiny fixture dataset and a tiny random Llama with an offline byte-level tokenizer."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import CHAT_TEMPLATE, byte_level_tokenizer, tiny_llama
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from duo_attn.eval import longbench as lb
from duo_attn.eval.harness import generate_greedy

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_TASKS = ["hotpotqa", "trec", "samsum", "multifieldqa_zh"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Trained on the fixture prompts, Chinese included."""
    corpus = [path.read_text(encoding="utf-8") for path in sorted(FIXTURES.glob("*.jsonl"))]
    corpus += list(lb.TASK_PROMPTS.values())
    return byte_level_tokenizer(corpus, 600)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(len(tokenizer))


@pytest.fixture
def counting(model, monkeypatch):
    """Records the kwargs of every ``model.generate`` call while still generating."""
    calls: list[dict] = []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tables_cover_all_tasks():
    assert set(lb.TASK_PROMPTS) == set(lb.LONGBENCH_TASKS) == set(lb.TASK_MAX_NEW_TOKENS)
    for task, template in lb.TASK_PROMPTS.items():
        filled = template.format(context="CTX", input="INP")
        assert "CTX" in filled, task
    assert lb.TASK_MAX_NEW_TOKENS["gov_report"] == 512 and lb.TASK_MAX_NEW_TOKENS["hotpotqa"] == 32
    assert lb.NO_CHAT_TEMPLATE_TASKS == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert all(lb.base_task(t) in lb.TASK_PROMPTS for t in lb.LONGBENCH_E_TASKS)


def test_load_task_local_and_errors(tmp_path):
    samples = lb.load_task("hotpotqa", FIXTURES)
    assert [s["_id"] for s in samples] == ["hp-1", "hp-2", "hp-3"]
    assert samples[0]["answers"] == ["Amsterdam"]
    with pytest.raises(FileNotFoundError):
        lb.load_task("qasper", FIXTURES)
    with pytest.raises(ValueError, match="data_dir"):
        lb.load_task("hotpotqa")
    with pytest.raises(ValueError, match="unknown LongBench task"):
        lb.load_task("not_a_task", FIXTURES)


def test_prompt_is_middle_truncated(tokenizer):
    sample = {"context": "The mill has a red roof. " * 200, "input": "What colour is the roof?"}
    full = lb.TASK_PROMPTS["hotpotqa"].format(**sample)
    budget = 80
    assert len(tokenizer(full)["input_ids"]) > budget
    ids = lb.build_prompt_ids("hotpotqa", sample, tokenizer, budget)
    # re-tokenising the joined halves may merge a token or two at the seam, never add many
    assert budget - 4 <= len(ids) <= budget + 2
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(full[:40])
    assert text.endswith("Question: What colour is the roof?\nAnswer:")
    # a prompt within budget is tokenised as is
    short = {"context": "short", "input": "q?"}
    expected = tokenizer(lb.TASK_PROMPTS["hotpotqa"].format(**short))["input_ids"]
    assert lb.build_prompt_ids("hotpotqa", short, tokenizer, budget) == expected


def test_chat_template_skipped_for_few_shot_tasks(tokenizer):
    chat = _tiny_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    sample = {"context": "ctx", "input": "q?"}
    qa = chat.decode(lb.build_prompt_ids("hotpotqa", sample, chat, 500))
    assert qa.startswith("<|user|>Answer the question") and qa.endswith("<|assistant|>")
    assert "<s>" not in qa  # the template's text is used as is; no extra BOS is added
    trec = chat.decode(lb.build_prompt_ids("trec", sample, chat, 500))
    assert trec.startswith("<s>Please determine") and "<|user|>" not in trec


def test_predict_writes_and_resumes(model, tokenizer, counting, tmp_path):
    out = tmp_path / "preds"
    out.mkdir()
    # pre-seed the second sample, as if a previous run had been killed after it
    seeded = {"pred": "seeded", "answers": ["Philip K. Dick"], "all_classes": None, "length": 5200, "_id": "hp-2"}
    (out / "hotpotqa.jsonl").write_text(json.dumps(seeded) + "\n", encoding="utf-8")

    samples = lb.load_task("hotpotqa", FIXTURES)
    path = lb.predict_task(model, tokenizer, "hotpotqa", samples, out, max_length=256)
    assert len(counting) == 2  # hp-2 was skipped
    records = _lines(path)
    assert [r["_id"] for r in records] == ["hp-2", "hp-1", "hp-3"]
    assert records[0]["pred"] == "seeded"
    for record in records:
        assert set(record) == {"pred", "answers", "all_classes", "length", "_id"}
        assert isinstance(record["pred"], str)
    assert counting[0]["max_new_tokens"] == 32 and counting[0]["do_sample"] is False

    # a rerun does nothing
    lb.predict_task(model, tokenizer, "hotpotqa", samples, out, max_length=256)
    assert len(counting) == 2

    # a torn last line (killed mid-write) is dropped and its sample redone
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"pred": "half')
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:2] + [lines[3]]), encoding="utf-8")  # remove hp-3, keep the torn tail
    lb.predict_task(model, tokenizer, "hotpotqa", samples, out, max_length=256)
    assert len(counting) == 3
    assert sorted(r["_id"] for r in _lines(path)) == ["hp-1", "hp-2", "hp-3"]


def test_predict_limit_and_samsum_newline_stop(model, tokenizer, counting, tmp_path):
    lb.predict(model, tokenizer, ["samsum", "trec"], tmp_path, max_length=512, data_dir=FIXTURES, limit=1)
    assert len(counting) == 2
    samsum, trec = counting
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert newline in samsum["eos_token_id"] and tokenizer.eos_token_id in samsum["eos_token_id"]
    assert samsum["min_new_tokens"] == 1 and samsum["max_new_tokens"] == 128
    assert newline not in trec["eos_token_id"] and "min_new_tokens" not in trec
    assert len(_lines(tmp_path / "samsum.jsonl")) == 1


def test_generate_greedy_chunked_prefill_matches(model, tokenizer):
    ids = tokenizer("The old mill by the river has a red roof and a blue door. " * 8)["input_ids"]
    plain = generate_greedy(model, tokenizer, ids, 12)
    assert generate_greedy(model, tokenizer, ids, 12, chunk_size=16) == plain


def _write_perfect(out: Path, tasks: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        with (out / f"{task}.jsonl").open("w", encoding="utf-8") as handle:
            for sample in lb.load_task(task, FIXTURES):
                record = {
                    "pred": sample["answers"][0],
                    "answers": sample["answers"],
                    "all_classes": sample["all_classes"],
                    "length": sample["length"],
                    "_id": sample["_id"],
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def test_score_perfect_predictions(tmp_path):
    _write_perfect(tmp_path, FIXTURE_TASKS)
    (tmp_path / "notes.jsonl").write_text("{}\n")  # not a task file: ignored
    result = lb.score_predictions(tmp_path, length_buckets=True)
    assert result["scores"] == {task: 100.0 for task in sorted(FIXTURE_TASKS)}
    assert result["average"] == 100.0
    assert result["n_samples"] == {"hotpotqa": 3, "multifieldqa_zh": 2, "samsum": 2, "trec": 2}
    # hotpotqa lengths 36 / 5200 / 9100 fill one bucket each; samsum has only short samples
    assert result["length_buckets"]["hotpotqa"] == {"0-4k": 100.0, "4-8k": 100.0, "8k+": 100.0}
    assert result["length_buckets"]["samsum"] == {"0-4k": 100.0, "4-8k": None, "8k+": None}
    assert json.loads((tmp_path / lb.RESULT_JSON).read_text()) == result
    table = (tmp_path / lb.RESULT_MD).read_text()
    assert "| hotpotqa | 100.00 | 3 | 100.00 | 100.00 | 100.00 |" in table
    assert "| samsum | 100.00 | 2 | 100.00 | - | - |" in table
    assert "**average**" in table


def test_score_mixed_predictions(tmp_path):
    _write_perfect(tmp_path, ["hotpotqa", "trec"])
    path = tmp_path / "hotpotqa.jsonl"
    records = _lines(path)
    records[0]["pred"] = "wrong"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = lb.score_predictions(tmp_path, ["hotpotqa", "trec"])
    # hotpotqa: 0 + 1 + 1 over 3 -> 66.67; average (66.67 + 100) / 2 = 83.335 -> 83.34 (float rounding may give .33)
    assert result["scores"] == {"hotpotqa": 66.67, "trec": 100.0}
    assert result["average"] == pytest.approx(83.33, abs=0.011)
    assert "length_buckets" not in result
    with pytest.raises(FileNotFoundError):
        lb.score_predictions(tmp_path, ["samsum"])


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_cli_help(monkeypatch, capsys):
    # runs the module as ``python -m`` would, in-process to avoid a second torch import
    monkeypatch.setattr(sys, "argv", ["longbench", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("duo_attn.eval.longbench", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "predict" in out and "score" in out


def test_cli_predict_and_score(model, tokenizer, monkeypatch, tmp_path, capsys):
    loaded, patched = [], []

    def load_model(name, dtype=None, device=None):
        loaded.append((name, dtype, device))
        return model, tokenizer

    def enable_duo_attention_eval(model_, pattern, sparsity=None):
        patched.append((pattern, sparsity))

    monkeypatch.setattr(lb, "load_model", load_model)
    monkeypatch.setattr(lb, "enable_duo_attention_eval", enable_duo_attention_eval)
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    out = tmp_path / "out"
    lb.main(
        ["predict", "--model", "tiny", "--data-dir", str(data), "--tasks", "multifieldqa_zh", "--out", str(out),
         "--dtype", "float32", "--device", "cpu", "--pattern", "pat", "--sparsity", "0.5", "--max-length", "300",
         "--limit", "1"]
    )  # fmt: skip
    assert loaded == [("tiny", torch.float32, "cpu")]
    assert patched == [("pat", 0.5)]
    assert len(_lines(out / "multifieldqa_zh.jsonl")) == 1
    assert "| multifieldqa_zh |" in capsys.readouterr().out
    assert json.loads((out / lb.RESULT_JSON).read_text())["n_samples"] == {"multifieldqa_zh": 1}

    lb.main(["score", "--out", str(out), "--buckets"])
    assert "0-4k" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lb.main(["predict", "--out", str(out)])  # neither --data-dir nor --from-hub
