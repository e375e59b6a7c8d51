"""The report of a grid evaluation (results.json, a markdown summary, one heatmap per method) and the command-line
plumbing the NIAH and passkey-grid commands share (common flags, loading, running and reporting)."""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..kv_quant import KVQuantSpec
from ..learn.haystack import encode_haystack, load_haystack
from ..models import DTYPES, MODEL_HELP, SMOLLM2, load_model, resolve_dtype
from .harness import HAYSTACK_CHARS_PER_TOKEN, GridCell, Method, build_methods, run_grid, window_sizes

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


def markdown_summary(
    title: str, methods: Sequence[Method], records: Sequence[dict[str, Any]], planned: int | None = None
) -> str:
    """Two tables, method x context: the scores (greedy / teacher-forced), then KV bytes and wall time per cell.
    ``planned`` (the cells a run meant to score) marks a run cut short by its time limit."""
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

    incomplete = planned is not None and len(records) < planned
    lines = [
        f"# {title}",
        "",
        *([f"**Incomplete**: the time limit stopped the run after {len(records)} of {planned} cells.", ""]
          if incomplete else []),  # fmt: skip
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
    planned: int | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``summary.md`` and a ``heatmap_<method>.png`` per method with records; returns their
    paths. ``planned``: the cells the run meant to score (a time limit may have stopped it sooner)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": {**config, "cells_planned": len(records) if planned is None else planned, "cells_done": len(records)},
        "methods": [m.describe() for m in methods],
        "summary": summarise(records),
        "records": list(records),
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path = out / "summary.md"
    md_path.write_text(markdown_summary(title, methods, records, planned))
    scored = {r["method"] for r in records}
    heatmaps = [
        plot_heatmap(out / f"heatmap_{_slug(m.name)}.png", m.name, records) for m in methods if m.name in scored
    ]
    return {"json": json_path, "markdown": md_path, "heatmaps": heatmaps}


# -------------------------------------------------------------------------------------------------- command line


def kv_quant_arg(text: str) -> str | None:
    """``--kv-quant`` values: ``none`` (the model dtype) or a kind (``int8``, ``int4``, ``fp8``, optionally with a
    group such as ``int4-g32``), checked as the flags are parsed, before any model is loaded."""
    if text.lower() == "none":
        return None
    try:
        KVQuantSpec.from_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


FLOOR_HELP = (
    "keep at least N retrieval heads in every layer when the duo, baseline and random gates are sparsified (the "
    "layer's highest gates; 0: rank all heads globally, which can leave a layer none); a nonzero N is named in the "
    "method, e.g. duo@0.50-floor1"
)

RANDOM_SEEDS_HELP = (
    "seeds of the random-head baseline: one random method per seed and sparsity, named random@0.50-seed3 when "
    "there are several (one draw of heads can be lucky or unlucky)"
)


def floor_arg(text: str) -> int:
    """``--min-retrieval-per-layer`` values: a non-negative integer, checked as the flags are parsed (before any
    model is loaded; the model's KV heads per layer bound it once it is)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, *, contexts: Sequence[int], depths: Sequence[float]) -> None:
    """Flags the NIAH and passkey-grid command lines share."""
    parser.add_argument("--model", default=SMOLLM2, help=MODEL_HELP)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--haystack", help=".txt / .jsonl / .jsonl.zst filler text (default: offline pydoc text)")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(contexts), help="context lengths (tokens)")
    parser.add_argument("--depths", type=float, nargs="+", default=list(depths), help="needle depths in [0, 1]")
    parser.add_argument("--sink", type=int, help="streaming sink size (default: the pattern's config, else 64)")
    parser.add_argument("--recent", type=int, help="streaming recent window (default: the pattern's config, else 256)")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0], help=RANDOM_SEEDS_HELP)
    parser.add_argument("--chunk-size", type=int, default=1024, help="pre-fill chunk size (tokens)")
    parser.add_argument("--extra-new-tokens", type=int, default=8, help="greedy tokens decoded beyond the answer's")
    parser.add_argument("--kv-quant", type=kv_quant_arg, nargs="+", default=[None], metavar="KIND",
                        help="how duo methods store their retrieval heads' cache: none (the model dtype), int8, int4 "
                        "or fp8 (e.g. 'none int8 int4': one row per value and method); KV bytes include the "
                        "scales and zeros")  # fmt: skip
    parser.add_argument("--min-retrieval-per-layer", type=floor_arg, default=0, metavar="N", help=FLOOR_HELP)
    parser.add_argument("--time-limit-minutes", type=float,
                        help="stop starting cells after this long (loading included) and report what was scored; "
                             "contexts run in the order given, every method at one before the next")  # fmt: skip


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
    *,
    kinds: Sequence[str],
    sparsities: Sequence[float],
    make_cells: Callable[[PreTrainedTokenizerBase, list[int]], list[GridCell]],
    title: str,
    desc: str,
    pattern: str | None = None,
    baseline_pattern: str | None = None,
) -> dict[str, Any]:
    """A grid command line once its flags are checked: load the model and haystack (`add_common_arguments`), build
    the methods (one streaming window for all: the flags, else the first pattern's), make the cells from the
    tokenizer and haystack ids, run the grid, write the report to ``args.output_dir`` and print it; returns the paths
    written. The reported time includes loading."""
    started = time.perf_counter()
    model, tokenizer, haystack_ids = load_for_eval(args)
    sink, recent = window_sizes(pattern or baseline_pattern, args.sink, args.recent)
    methods = build_methods(
        model.config, kinds, sparsities=sparsities, sink_size=sink, recent_size=recent, pattern=pattern,
        baseline_pattern=baseline_pattern, random_seeds=args.random_seeds, kv_quants=args.kv_quant,
        min_retrieval_per_layer=args.min_retrieval_per_layer,
    )  # fmt: skip
    cells = make_cells(tokenizer, haystack_ids)
    limit = args.time_limit_minutes
    records = run_grid(
        model, tokenizer, methods, cells, chunk_size=args.chunk_size, extra_new_tokens=args.extra_new_tokens,
        desc=desc, deadline=None if limit is None else started + 60.0 * limit,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    config = run_config(args, model, sink_size=sink, recent_size=recent, total_seconds=seconds)
    paths = write_report(args.output_dir, title, config, methods, records, planned=len(methods) * len(cells))
    print(paths["markdown"].read_text())
    print(
        f"{len(records)} of {len(methods) * len(cells)} cells in {seconds:.1f} s "
        f"({seconds / max(1, len(records)):.2f} s per cell, loading and teacher-forced pass included); "
        f"wrote {args.output_dir}"
    )
    return paths
