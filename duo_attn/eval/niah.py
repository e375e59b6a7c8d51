"""Needle in a haystack, plus the scoring primitive and grid machinery that the passkey grid and the demo share.

Why two scores per prompt: greedy exact match is what a user sees, but a small model's greedy answers get flaky at
long contexts even with full attention. Teacher-forced answer-token accuracy (the argmax at every answer position,
given the correct prefix) isolates whether the needle can still be *read* through the KV cache, which is exactly
what turning heads into streaming heads can break.

Command line (``--help`` lists everything)::

    python -m duo_attn.eval.niah --contexts 512 1024 2048 --depths 0 0.25 0.5 0.75 1 \\
        --methods full duo random streaming --pattern attn_patterns/... --sparsities 0.25 0.5 0.75 \\
        --output-dir runs/niah
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..compat import cache_kwargs
from ..learn.data import NeedlePrompt, build_needle_prompt, encode_haystack, load_haystack
from ..kv_cache import DuoCache
from ..models import DTYPES, SMOLLM2, load_model, resolve_dtype
from ..patch import disable_duo_attention, enable_duo_attention_eval
from ..patterns import PatternError, load_attn_pattern, sparsify_attention_heads

DEFAULT_SINK_SIZE, DEFAULT_RECENT_SIZE = 64, 256  # streaming window when neither flags nor a pattern say otherwise
METHOD_KINDS: tuple[str, ...] = ("full", "duo", "baseline", "random", "streaming")
HAYSTACK_CHARS_PER_TOKEN = 16  # read this many haystack characters per context token: plenty, never the whole corpus

NIAH_NEEDLE = "The special magic number is 7491."
NIAH_QUESTION = "What is the special magic number?"
NIAH_ANSWER_PREFIX = "The special magic number is"
NIAH_ANSWER = "7491"


# ------------------------------------------------------------------------------------------- scoring primitive


@dataclass(frozen=True)
class AnswerScore:
    """How one prompt fared under the model's current attention; ``seconds`` is pre-fill plus greedy decoding."""

    generated: str
    greedy_match: bool
    teacher_forced_accuracy: float
    kv_bytes: int
    prefill_seconds: float
    seconds: float


def new_cache(model: PreTrainedModel) -> Cache:
    """The cache the model would make itself: a `DuoCache` when it is duo-patched, else a `DynamicCache`."""
    if getattr(model, "duo_attention", None) is not None:
        return DuoCache.for_model(model)
    return DynamicCache(config=model.config)


def kv_bytes(cache: Cache) -> int:
    """Bytes of keys and values a cache holds (a DuoCache counts its streaming windows at their fixed size)."""
    if isinstance(cache, DuoCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs, so line breaks or double spaces in a generation do not hide a correct answer."""
    return " ".join(text.split())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: PreTrainedModel, prompt_ids: torch.Tensor, cache: Cache, chunk_size: int = 1024) -> torch.Tensor:
    """Feed the prompt ``chunk_size`` tokens at a time into ``cache``; returns the last token's logits ``[vocab]``.

    Chunking bounds the attention-score memory of long prompts, and exercises the duo cache as serving would.
    """
    ids = prompt_ids.reshape(1, -1).to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        logits = model(chunk, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
    return logits[0, -1]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


@torch.no_grad()
def _teacher_forced_accuracy(
    model: PreTrainedModel, cache: Cache, last_logits: torch.Tensor, answer_ids: torch.Tensor
) -> float:
    predictions = [last_logits.argmax().view(1)]
    if answer_ids.numel() > 1:
        logits = model(answer_ids[None, :-1], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=0).logits
        predictions.append(logits[0].argmax(-1))
    return (torch.cat(predictions) == answer_ids).float().mean().item()


@torch.no_grad()
def _greedy_decode(
    model: PreTrainedModel, cache: Cache, last_logits: torch.Tensor, max_new_tokens: int, eos_ids: set[int]
) -> list[int]:
    tokens: list[int] = []
    next_token = last_logits.argmax()
    while True:
        tokens.append(int(next_token))
        if tokens[-1] in eos_ids or len(tokens) >= max_new_tokens:
            return tokens
        logits = model(next_token.view(1, 1), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        next_token = logits[0, -1].argmax()


def score_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    *,
    answer: str | None = None,
    chunk_size: int = 1024,
    extra_new_tokens: int = 8,
) -> AnswerScore:
    """Score one prompt under the model's current attention (full, or duo when patched).

    (1) Pre-fills the prompt in chunks and decodes greedily up to ``len(answer_ids) + extra_new_tokens`` tokens
    (stopping at EOS); a match is ``answer`` (default: the decoded answer ids) occurring in the text, whitespace
    normalised. ``kv_bytes`` is what the cache holds after pre-fill; ``seconds`` is pre-fill plus decoding.
    (2) On a copy of the pre-filled cache, feeds the answer tokens as one chunk and counts the argmax predictions
    equal to the next answer token; the first answer token is predicted from the prompt's last logits.
    """
    device = model.device
    answer_ids = answer_ids.reshape(-1).to(device)
    if answer_ids.numel() == 0:
        raise ValueError("the answer is empty")
    expected = normalize_whitespace(
        tokenizer.decode(answer_ids.tolist(), skip_special_tokens=True) if answer is None else answer
    )
    if not expected:
        raise ValueError("the answer is only whitespace; greedy matching would be meaningless")
    _synchronize(device)
    start = time.perf_counter()
    cache = new_cache(model)
    last_logits = prefill(model, prompt_ids, cache, chunk_size)
    _synchronize(device)
    prefill_seconds = time.perf_counter() - start
    held = kv_bytes(cache)
    forced_cache = copy.deepcopy(cache)  # not timed
    start = time.perf_counter()
    tokens = _greedy_decode(
        model, cache, last_logits, answer_ids.numel() + extra_new_tokens, _eos_ids(model, tokenizer)
    )
    _synchronize(device)
    seconds = prefill_seconds + time.perf_counter() - start
    del cache
    accuracy = _teacher_forced_accuracy(model, forced_cache, last_logits, answer_ids)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return AnswerScore(text, expected in normalize_whitespace(text), accuracy, held, prefill_seconds, seconds)


def key_only(tokenizer: PreTrainedTokenizerBase, prompt: NeedlePrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Move leading whitespace-only answer tokens into the prompt: ``(prompt_ids, answer_ids)``.

    SmolLM2 encodes " 7491" as " ", "7", "4", "9", "1"; the lone space is trivially predictable, so leaving it in
    would inflate teacher-forced accuracy. Afterwards the accuracy counts only the key's own tokens.
    """
    answer = prompt.answer_ids
    moved = 0
    while moved < answer.numel() - 1 and not tokenizer.decode(answer[moved : moved + 1].tolist()).strip():
        moved += 1
    return torch.cat([prompt.prompt_ids, answer[:moved]]), answer[moved:]


# ------------------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class Method:
    """One attention setting to evaluate: full attention (``retrieval_mask`` None, model unpatched) or a duo mask."""

    name: str
    kind: str
    retrieval_mask: np.ndarray | None  # [layers, kv_heads] bool, True = retrieval head
    sink_size: int
    recent_size: int
    source: str | None = None  # the pattern directory, or the random seed, the mask came from

    @property
    def retrieval_fraction(self) -> float:
        return 1.0 if self.retrieval_mask is None else float(self.retrieval_mask.mean())

    @property
    def retrieval_heads(self) -> str:
        """E.g. ``"22/90 (24%)"``: the exact count, since a sparsity rarely divides the head count evenly."""
        if self.retrieval_mask is None:
            return "all"
        return f"{int(self.retrieval_mask.sum())}/{self.retrieval_mask.size} ({self.retrieval_fraction:.0%})"

    def apply(self, model: PreTrainedModel) -> None:
        """Put ``model`` into this setting (patching, re-patching or unpatching it)."""
        if self.retrieval_mask is None:
            if getattr(model, "duo_attention", None) is not None:
                disable_duo_attention(model)
            return
        enable_duo_attention_eval(
            model, self.retrieval_mask.astype(np.float64), sink_size=self.sink_size, recent_size=self.recent_size
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, mask included, so a result file says exactly which heads were streaming."""
        mask = self.retrieval_mask
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "retrieval_fraction": self.retrieval_fraction,
            "sparsity": 1.0 - self.retrieval_fraction,
            "sink_size": None if mask is None else self.sink_size,
            "recent_size": None if mask is None else self.recent_size,
            "retrieval_mask": None if mask is None else mask.astype(int).tolist(),
        }


def window_sizes(pattern: str | Path | None, sink_size: int | None, recent_size: int | None) -> tuple[int, int]:
    """Streaming window for every duo method: explicit values, else the pattern's ``config.json``, else 64/256.

    One window for all methods, so they are compared at the same KV budget.
    """
    file_sink, file_recent = (DEFAULT_SINK_SIZE, DEFAULT_RECENT_SIZE)
    if pattern is not None:
        _, file_sink, file_recent = load_attn_pattern(pattern)
    return (file_sink if sink_size is None else sink_size), (file_recent if recent_size is None else recent_size)


def build_methods(
    config: PreTrainedConfig,
    kinds: Sequence[str],
    *,
    sparsities: Sequence[float] = (),
    sink_size: int = DEFAULT_SINK_SIZE,
    recent_size: int = DEFAULT_RECENT_SIZE,
    pattern: str | Path | None = None,
    baseline_pattern: str | Path | None = None,
    seed: int = 0,
) -> list[Method]:
    """Methods in the order of ``kinds``: ``full``; ``streaming`` (every head streaming); and, at each sparsity,
    ``duo`` (``pattern``'s gates), ``baseline`` (``baseline_pattern``'s gates) and ``random`` (seeded random gates,
    so masks at different sparsities are nested)."""
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    gate_sources: dict[str, tuple[np.ndarray, str]] = {}
    for kind, path in (("duo", pattern), ("baseline", baseline_pattern)):
        if kind in kinds:
            if path is None:
                raise PatternError(f"method {kind!r} needs a pattern directory")
            gate_sources[kind] = (load_attn_pattern(path)[0], str(path))
    gate_sources["random"] = (np.random.default_rng(seed).random(shape), f"seed {seed}")
    methods: list[Method] = []
    for kind in kinds:
        if kind == "full":
            methods.append(Method("full", kind, None, sink_size, recent_size))
        elif kind == "streaming":
            methods.append(Method("streaming", kind, np.zeros(shape, dtype=bool), sink_size, recent_size))
        elif kind in gate_sources:
            if not sparsities:
                raise ValueError(f"method {kind!r} needs at least one sparsity")
            gates, source = gate_sources[kind]
            if gates.shape != shape:
                raise PatternError(f"{source}: pattern has shape {gates.shape}, the model needs {shape}")
            for sparsity in sparsities:
                mask, _ = sparsify_attention_heads(gates, sparsity=sparsity)  # named by the sparsity asked for
                methods.append(Method(f"{kind}@{sparsity:.2f}", kind, mask, sink_size, recent_size, source))
        else:
            raise ValueError(f"unknown method {kind!r}; expected one of {METHOD_KINDS}")
    return methods


# --------------------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridCell:
    """One prompt of a grid: where its needle is, and the answer it should produce."""

    context_length: int
    depth: float
    sample: int
    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    answer: str


def needle_cells(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: Sequence[int],
    contexts: Sequence[int],
    depths: Sequence[float],
    *,
    needle: str = NIAH_NEEDLE,
    question: str = NIAH_QUESTION,
    answer: str = NIAH_ANSWER,
    answer_prefix: str = NIAH_ANSWER_PREFIX,
) -> list[GridCell]:
    """One needle prompt per (context length, depth), the same needle and filler everywhere (the classic setup)."""
    cells = []
    for context in contexts:
        for depth in depths:
            prompt = build_needle_prompt(
                tokenizer, haystack_ids, context, depth, needle, question, answer_prefix, answer=answer
            )
            prompt_ids, answer_ids = key_only(tokenizer, prompt)
            cells.append(GridCell(context, depth, 0, prompt_ids, answer_ids, answer.strip()))
    return cells


def run_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    cells: Sequence[GridCell],
    *,
    chunk_size: int = 1024,
    extra_new_tokens: int = 8,
    desc: str = "grid",
) -> list[dict[str, Any]]:
    """Score every cell under every method; one JSON-ready record per (method, cell). The model ends unpatched."""
    records = []
    try:
        with tqdm(total=len(methods) * len(cells), desc=desc, unit="cell") as bar:
            for method in methods:
                method.apply(model)
                for cell in cells:
                    bar.set_postfix_str(f"{method.name} {cell.context_length} tok depth {cell.depth:g}")
                    score = score_answer(
                        model,
                        tokenizer,
                        cell.prompt_ids,
                        cell.answer_ids,
                        answer=cell.answer,
                        chunk_size=chunk_size,
                        extra_new_tokens=extra_new_tokens,
                    )
                    records.append(
                        {
                            "method": method.name,
                            "context_length": cell.context_length,
                            "depth": cell.depth,
                            "sample": cell.sample,
                            "prompt_tokens": int(cell.prompt_ids.numel()),
                            "answer": cell.answer,
                            "generated": score.generated,
                            "greedy_match": score.greedy_match,
                            "teacher_forced_accuracy": score.teacher_forced_accuracy,
                            "kv_bytes": score.kv_bytes,
                            "prefill_seconds": score.prefill_seconds,
                            "seconds": score.seconds,
                        }
                    )
                    bar.update()
    finally:
        if getattr(model, "duo_attention", None) is not None:
            disable_duo_attention(model)
    return records


# ------------------------------------------------------------------------------------------------------ reports

_SUMMARY_FIELDS = ("greedy_match", "teacher_forced_accuracy", "kv_bytes", "seconds")


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``method -> context length (as a string) or "mean" -> mean of each score``, over depths and samples."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[record["method"]][str(record["context_length"])].append(record)
        groups[record["method"]]["mean"].append(record)
    return {
        method: {
            context: {name: float(np.mean([float(r[name]) for r in rows])) for name in _SUMMARY_FIELDS}
            for context, rows in by_context.items()
        }
        for method, by_context in groups.items()
    }


def _contexts(records: Sequence[dict[str, Any]]) -> list[int]:
    return sorted({r["context_length"] for r in records})


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_summary(title: str, methods: Sequence[Method], records: Sequence[dict[str, Any]]) -> str:
    """Two tables, method x context: the scores (greedy / teacher-forced), then KV bytes and wall time per cell."""
    summary = summarise(records)
    contexts = [str(c) for c in _contexts(records)]
    columns = ["method", "retrieval heads", *(f"{c} tok" for c in contexts)]

    def row(method: Method, keys: Sequence[str], fmt: Callable[[dict[str, float]], str]) -> list[str]:
        cells = summary.get(method.name, {})
        return [method.name, method.retrieval_heads, *(fmt(cells[k]) if k in cells else "-" for k in keys)]

    def scores(s: dict[str, float]) -> str:
        return f"{s['greedy_match']:.2f} / {s['teacher_forced_accuracy']:.2f}"

    def costs(s: dict[str, float]) -> str:
        return f"{s['kv_bytes'] / 2**20:.2f} MiB, {s['seconds']:.2f} s"

    lines = [
        f"# {title}",
        "",
        "Each entry: greedy exact match / teacher-forced answer-token accuracy, mean over depths (and samples).",
        "",
        *_table([*columns, "mean"], [row(m, [*contexts, "mean"], scores) for m in methods]),
        "",
        "KV cache held after pre-fill (MiB) and time per cell (s) for pre-fill + greedy decoding:",
        "",
        *_table(columns, [row(m, contexts, costs) for m in methods]),
    ]
    return "\n".join(lines) + "\n"


def plot_heatmap(path: Path, method: str, records: Sequence[dict[str, Any]]) -> Path:
    """Depth x context heatmap of one method's teacher-forced accuracy (mean over samples), values written in."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend needed

    rows = [r for r in records if r["method"] == method]
    contexts = _contexts(rows)
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(contexts)), np.nan)
    for i, depth in enumerate(depths):
        for j, context in enumerate(contexts):
            values = [
                r["teacher_forced_accuracy"] for r in rows if r["depth"] == depth and r["context_length"] == context
            ]
            if values:
                grid[i, j] = np.mean(values)
    fig = Figure(figsize=(1.4 * len(contexts) + 2.5, 0.6 * len(depths) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(contexts)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{method}: teacher-forced accuracy")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name)


def write_report(
    output_dir: str | Path,
    title: str,
    config: dict[str, Any],
    methods: Sequence[Method],
    records: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Write ``results.json``, ``summary.md`` and ``heatmap_<method>.png`` files; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": config,
        "methods": [m.describe() for m in methods],
        "summary": summarise(records),
        "records": list(records),
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path = out / "summary.md"
    md_path.write_text(markdown_summary(title, methods, records))
    heatmaps = [plot_heatmap(out / f"heatmap_{_slug(m.name)}.png", m.name, records) for m in methods]
    return {"json": json_path, "markdown": md_path, "heatmaps": heatmaps}


# -------------------------------------------------------------------------------------------------- command line


def add_common_arguments(parser: argparse.ArgumentParser, *, contexts: Sequence[int], depths: Sequence[float]) -> None:
    """Flags the NIAH and passkey-grid command lines share."""
    parser.add_argument("--model", default=SMOLLM2, help="'smollm2' (offline) or a local model directory")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--haystack", help=".txt / .jsonl / .jsonl.zst filler text (default: offline pydoc text)")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(contexts), help="context lengths (tokens)")
    parser.add_argument("--depths", type=float, nargs="+", default=list(depths), help="needle depths in [0, 1]")
    parser.add_argument("--sink", type=int, help="streaming sink size (default: the pattern's config, else 64)")
    parser.add_argument("--recent", type=int, help="streaming recent window (default: the pattern's config, else 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-head baseline")
    parser.add_argument("--chunk-size", type=int, default=1024, help="pre-fill chunk size (tokens)")
    parser.add_argument("--extra-new-tokens", type=int, default=8, help="greedy tokens decoded beyond the answer's")


def load_for_eval(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[int]]:
    """Model, tokenizer and the tokenized haystack, from the common flags."""
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    text = load_haystack(args.haystack, max_chars=HAYSTACK_CHARS_PER_TOKEN * max(args.contexts))
    return model, tokenizer, encode_haystack(tokenizer, text)


def run_config(args: argparse.Namespace, model: PreTrainedModel, **extra: Any) -> dict[str, Any]:
    """What a result file records about its run."""
    return {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_type": model.config.model_type,
        "torch_dtype": str(model.dtype),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        **extra,
    }


def run_and_report(
    args: argparse.Namespace,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    cells: Sequence[GridCell],
    *,
    title: str,
    desc: str,
    started: float,
    sink_size: int,
    recent_size: int,
) -> dict[str, Any]:
    """The end of a grid command line: run the grid, write the report to ``args.output_dir`` and print it; returns
    the paths written. ``started`` is the ``time.perf_counter()`` before loading, so the reported time includes it."""
    records = run_grid(
        model, tokenizer, methods, cells, chunk_size=args.chunk_size, extra_new_tokens=args.extra_new_tokens,
        desc=desc,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    config = run_config(args, model, sink_size=sink_size, recent_size=recent_size, total_seconds=seconds)
    paths = write_report(args.output_dir, title, config, methods, records)
    print(paths["markdown"].read_text())
    print(
        f"{len(records)} cells in {seconds:.1f} s ({seconds / len(records):.2f} s per cell, loading and "
        f"teacher-forced pass included); wrote {args.output_dir}"
    )
    return paths


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn niah",
        description="Needle-in-a-haystack grid (context length x depth) for full attention, DuoAttention patterns, "
        "random head choices and all-streaming heads. Writes results.json, summary.md and one heatmap per method.",
    )
    add_common_arguments(parser, contexts=(512, 1024, 2048), depths=(0.0, 0.25, 0.5, 0.75, 1.0))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("full", "duo", "random", "streaming"),
        help="default: full duo random streaming with --pattern, else full streaming",
    )
    parser.add_argument("--pattern", help="attention pattern directory (for duo, and the default window sizes)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5], help="streaming-head fractions")
    parser.add_argument("--needle", default=NIAH_NEEDLE)
    parser.add_argument("--question", default=NIAH_QUESTION)
    parser.add_argument("--answer", default=NIAH_ANSWER, help="what the model must produce")
    parser.add_argument("--answer-prefix", default=NIAH_ANSWER_PREFIX, help="opens the answer ('' for none)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/niah"))
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the NIAH grid and write its report; returns the paths written."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    kinds = args.methods or (["full", "duo", "random", "streaming"] if args.pattern else ["full", "streaming"])
    if "duo" in kinds and not args.pattern:
        parser.error("method 'duo' needs --pattern DIR")
    started = time.perf_counter()
    model, tokenizer, haystack_ids = load_for_eval(args)
    sink, recent = window_sizes(args.pattern, args.sink, args.recent)
    methods = build_methods(
        model.config, kinds, sparsities=args.sparsities, sink_size=sink, recent_size=recent, pattern=args.pattern,
        seed=args.seed,
    )  # fmt: skip
    cells = needle_cells(
        tokenizer, haystack_ids, args.contexts, args.depths,
        needle=args.needle, question=args.question, answer=args.answer, answer_prefix=args.answer_prefix,
    )  # fmt: skip
    return run_and_report(
        args, model, tokenizer, methods, cells, title="Needle in a haystack", desc="niah", started=started,
        sink_size=sink, recent_size=recent,
    )  # fmt: skip


if __name__ == "__main__":
    main()
