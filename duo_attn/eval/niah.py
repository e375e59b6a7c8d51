"""Needle in a haystack: one needle prompt per (context length, depth), scored under every method.

Command line (``--help`` lists everything)::

    python -m duo_attn.eval.niah --contexts 512 1024 2048 --depths 0 0.25 0.5 0.75 1 \\
        --methods full duo random streaming --pattern attn_patterns/... --sparsities 0.25 0.5 0.75 \\
        --output-dir runs/niah
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..learn.data import build_needle_prompt
from .harness import METHOD_KINDS, GridCell, key_only
from .report import add_common_arguments, run_and_report

NIAH_NEEDLE = "The special magic number is 7491."
NIAH_QUESTION = "What is the special magic number?"
NIAH_ANSWER_PREFIX = "The special magic number is"
NIAH_ANSWER = "7491"


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
        choices=METHOD_KINDS,
        help="default: full, duo (with --pattern), baseline (with --baseline-pattern), random with either, streaming",
    )
    parser.add_argument("--pattern", help="attention pattern directory (for duo, and the default window sizes)")
    parser.add_argument("--baseline-pattern", help="a second pattern, e.g. training-free scores (method 'baseline')")
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
    patterns = {"duo": args.pattern, "baseline": args.baseline_pattern}
    kinds = args.methods or [
        "full", *(kind for kind, path in patterns.items() if path), *(["random"] if any(patterns.values()) else []),
        "streaming",
    ]  # fmt: skip
    for kind, flag in (("duo", "--pattern"), ("baseline", "--baseline-pattern")):
        if kind in kinds and patterns[kind] is None:
            parser.error(f"method {kind!r} needs {flag} DIR")
    return run_and_report(
        args, kinds=kinds, sparsities=args.sparsities, pattern=args.pattern, baseline_pattern=args.baseline_pattern,
        title="Needle in a haystack", desc="niah",
        make_cells=lambda tokenizer, haystack_ids: needle_cells(
            tokenizer, haystack_ids, args.contexts, args.depths,
            needle=args.needle, question=args.question, answer=args.answer, answer_prefix=args.answer_prefix,
        ),
    )  # fmt: skip

if __name__ == "__main__":
    main()
