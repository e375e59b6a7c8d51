"""Held-out passkey grid: does a learned pattern keep the heads that retrieve, at a given retrieval-head budget?

Contexts x depths x several random 5-digit passkeys per cell, one needle per prompt ("The pass key is 71432.
Remember it."), then the question and the opened answer. Passkeys and filler offsets come from a seed stream of
their own (``duo-attn-passkey-grid:...``), never the training stream (``duo-attn-passkey:...``), so training never
saw these samples. Methods: full attention, the learned pattern and a second (e.g. training-free) pattern at the
same retrieval fractions (sparsity = 1 - retrieval fraction), random heads at those fractions, and all-streaming.

Command line (``--help`` lists everything)::

    python -m duo_attn.eval.passkey_grid --pattern attn_patterns/... --baseline-pattern attn_patterns/score \\
        --retrieval-fractions 0.25 0.5 --output-dir runs/passkey_grid [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..learn.data import NeedlePrompt, build_needle_prompt
from .harness import GridCell, key_only
from .report import add_common_arguments, run_and_report

PASSKEY_NEEDLE = "The pass key is {passkey}. Remember it."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
SEED_STREAM = "duo-attn-passkey-grid"  # distinct from the training data's "duo-attn-passkey" stream


def passkey_prompt(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: Sequence[int],
    context_length: int,
    depth: float,
    passkey: str,
    filler_offset: int = 0,
) -> NeedlePrompt:
    """One passkey needle at ``depth`` in filler that starts ``filler_offset`` tokens into the haystack."""
    offset = filler_offset % len(haystack_ids) if haystack_ids else 0
    rotated = list(haystack_ids[offset:]) + list(haystack_ids[:offset])
    needle = PASSKEY_NEEDLE.format(passkey=passkey)
    return build_needle_prompt(
        tokenizer, rotated, context_length, depth, needle, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, answer=passkey
    )


def draw_passkeys(seed: int, context_length: int, depth: float, count: int) -> list[tuple[str, int]]:
    """``count`` distinct 5-digit passkeys, each with a filler offset; a pure function of the cell and seed."""
    rng = random.Random(f"{SEED_STREAM}:{seed}:{context_length}:{depth!r}")
    keys: list[tuple[str, int]] = []
    while len(keys) < count:
        key = str(rng.randint(10_000, 99_999))
        if key not in (k for k, _ in keys):
            keys.append((key, rng.getrandbits(32)))
    return keys


def passkey_cells(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: Sequence[int],
    contexts: Sequence[int],
    depths: Sequence[float],
    *,
    keys_per_cell: int = 3,
    seed: int = 0,
) -> list[GridCell]:
    """``keys_per_cell`` passkey prompts for every (context length, depth)."""
    if keys_per_cell < 1:
        raise ValueError(f"keys_per_cell must be >= 1, got {keys_per_cell}")
    cells = []
    for context in contexts:
        for depth in depths:
            for sample, (key, offset) in enumerate(draw_passkeys(seed, context, depth, keys_per_cell)):
                prompt = passkey_prompt(tokenizer, haystack_ids, context, depth, key, offset)
                prompt_ids, answer_ids = key_only(tokenizer, prompt)
                cells.append(GridCell(context, depth, sample, prompt_ids, answer_ids, key))
    return cells


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn passkey-grid",
        description="Held-out passkey grid (contexts x depths x keys) comparing full attention, a learned pattern, a "
        "second pattern, random heads and all-streaming heads at the same retrieval-head fractions. Writes "
        "results.json, summary.md and one heatmap per method.",
    )
    add_common_arguments(parser, contexts=(1024, 2048, 4096), depths=(0.1, 0.3, 0.5, 0.7, 0.9))
    parser.add_argument("--keys-per-cell", type=int, default=3, help="distinct random passkeys per cell")
    parser.add_argument("--key-seed", type=int, default=0, help="seed of the passkeys and filler offsets")
    parser.add_argument("--pattern", help="the learned pattern directory (method 'duo')")
    parser.add_argument("--baseline-pattern", help="a second pattern, e.g. training-free scores (method 'baseline')")
    parser.add_argument(
        "--retrieval-fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help="fractions of KV heads kept as retrieval heads (sparsity = 1 - fraction)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("full", "duo", "baseline", "random", "streaming"),
        help="default: full, duo (with --pattern), baseline (with --baseline-pattern), random, streaming",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/passkey_grid"))
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the passkey grid and write its report; returns the paths written."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    kinds = args.methods or [
        "full",
        *(["duo"] if args.pattern else []),
        *(["baseline"] if args.baseline_pattern else []),
        "random",
        "streaming",
    ]
    for kind, flag, value in (
        ("duo", "--pattern", args.pattern),
        ("baseline", "--baseline-pattern", args.baseline_pattern),
    ):
        if kind in kinds and value is None:
            parser.error(f"method {kind!r} needs {flag} DIR")
    if any(not 0.0 <= f <= 1.0 for f in args.retrieval_fractions):
        parser.error("--retrieval-fractions must lie in [0, 1]")
    return run_and_report(
        args, kinds=kinds, sparsities=[1.0 - f for f in args.retrieval_fractions], pattern=args.pattern,
        baseline_pattern=args.baseline_pattern, title="Held-out passkey grid", desc="passkey grid",
        make_cells=lambda tokenizer, haystack_ids: passkey_cells(
            tokenizer, haystack_ids, args.contexts, args.depths, keys_per_cell=args.keys_per_cell, seed=args.key_seed
        ),
    )  # fmt: skip

if __name__ == "__main__":
    main()
