"""The passkey demo: the same long prompts answered with full attention and with DuoAttention, side by side.

It shows what DuoAttention is for in a couple of minutes on a CPU: the answers (and how well the passkey can still be
read, as teacher-forced digit accuracy) next to the KV-cache memory each setting holds after pre-fill.

    python -m duo_attn.demo [--pattern DIR] [--sparsity 0.5] [--context-length 1024] [--depths 0.2 0.5 0.8]
                            [--kv-quant int4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .eval.harness import (
    HAYSTACK_CHARS_PER_TOKEN,
    GridCell,
    Method,
    build_methods,
    normalize_whitespace,
    run_grid,
    window_sizes,
)
from .eval.passkey_grid import passkey_cells
from .eval.report import kv_quant_arg, summarise
from .learn.haystack import encode_haystack, load_haystack
from .models import DTYPES, SMOLLM2, load_model, resolve_dtype
from .patterns import GATES_FILE, SHIPPED_PATTERNS, default_pattern


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn demo",
        description="Answer a few ~1K-token passkey prompts with full attention and with DuoAttention on "
        "SmolLM2-135M-Instruct (offline), and compare answers, teacher-forced digit accuracy, KV-cache bytes and time.",
    )
    parser.add_argument(
        "--pattern",
        type=Path,
        help=f"attention pattern directory (default: the first one shipped under {SHIPPED_PATTERNS})",
    )
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of KV heads made streaming heads")
    parser.add_argument("--sink", type=int, help="streaming sink size (default: the pattern's config)")
    parser.add_argument("--recent", type=int, help="streaming recent window (default: the pattern's config)")
    parser.add_argument("--context-length", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8], help="passkey depths, one prompt each"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    parser.add_argument("--model", default=SMOLLM2, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--chunk-size", type=int, default=1024, help="pre-fill chunk size (tokens)")
    parser.add_argument("--kv-quant", type=kv_quant_arg, metavar="KIND",
                        help="store duo's retrieval heads quantized: int8, int4 or fp8 (default none: the model "
                        "dtype); the KV bytes shown include scales and zeros")  # fmt: skip
    return parser


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the demo and print its report; returns the per-(method, prompt) records."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    pattern = args.pattern or default_pattern(SHIPPED_PATTERNS)
    if pattern is None:
        parser.error(
            f"no attention pattern found under {SHIPPED_PATTERNS}: pass --pattern DIR (a directory with "
            f"{GATES_FILE} and config.json, e.g. one written by duo_attn.learn.train or duo_attn.learn.scoring)"
        )
    if not 0.0 <= args.sparsity <= 1.0:
        parser.error("--sparsity must lie in [0, 1]")

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    haystack = load_haystack(None, max_chars=HAYSTACK_CHARS_PER_TOKEN * args.context_length)
    cells = passkey_cells(
        tokenizer, encode_haystack(tokenizer, haystack), [args.context_length], args.depths, keys_per_cell=1,
        seed=args.seed,
    )  # fmt: skip
    sink, recent = window_sizes(pattern, args.sink, args.recent)
    methods = build_methods(
        model.config, ["full", "duo"], sparsities=[args.sparsity], sink_size=sink, recent_size=recent, pattern=pattern,
        kv_quants=[args.kv_quant],
    )  # fmt: skip
    duo = methods[1]
    print(
        f"model {model.config.model_type}, {model.config.num_hidden_layers} layers x "
        f"{model.config.num_key_value_heads} KV heads, {model.dtype}, {args.device}; "
        f"loaded in {time.perf_counter() - started:.1f} s"
    )
    print(
        f"pattern {pattern}: {duo.retrieval_heads} KV heads kept as retrieval heads (sparsity {args.sparsity:g}), "
        f"streaming heads keep sink {sink} + recent {recent} tokens; retrieval heads stored as "
        f"{args.kv_quant or model.dtype}\n"
    )
    records = run_grid(model, tokenizer, methods, cells, chunk_size=args.chunk_size, desc="demo")
    _print_answers(cells, *([r for r in records if r["method"] == m.name] for m in methods))
    _print_costs(methods, records, started)
    return records


def _print_answers(cells: Sequence[GridCell], full: list[dict[str, Any]], duo: list[dict[str, Any]]) -> None:
    """Each prompt's answer under full attention and under duo attention."""
    for i, (cell, f, d) in enumerate(zip(cells, full, duo), start=1):
        print(f"prompt {i}/{len(cells)}: {f['prompt_tokens']} tokens, passkey {cell.answer} at depth {cell.depth:g}")
        for label, r in (("full", f), ("duo ", d)):
            verdict = "correct" if r["greedy_match"] else "wrong"
            print(
                f"  {label} answer: {normalize_whitespace(r['generated'])!r:<28} {verdict:<8} "
                f"teacher-forced digit accuracy {r['teacher_forced_accuracy']:.2f}"
            )
    print()


def _print_costs(methods: Sequence[Method], records: Sequence[dict[str, Any]], started: float) -> None:
    """Per method the mean KV bytes, time and scores over the prompts, then duo's share of the full KV cache and the
    time since ``started``."""
    means = {name: by_context["mean"] for name, by_context in summarise(records).items()}
    prompts = len(records) // len(methods)
    for method in methods:
        mean = means[method.name]
        print(
            f"{method.name:<9} KV cache after pre-fill {_mib(mean['kv_bytes']):>10}   {mean['seconds']:.2f} s per "
            f"prompt   answers correct {round(mean['greedy_match'] * prompts)}/{prompts}   mean teacher-forced "
            f"accuracy {mean['teacher_forced_accuracy']:.2f}"
        )
    full, duo = methods
    share = means[duo.name]["kv_bytes"] / means[full.name]["kv_bytes"]
    print(f"duo holds {share:.0%} of the full KV cache; demo took {time.perf_counter() - started:.1f} s")

if __name__ == "__main__":
    main()
