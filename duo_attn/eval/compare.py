"""Two methods of a synthetic run compared sample by sample: with a few samples per task, the difference of two
averages is mostly noise, and only a paired comparison (the same prompts under both) says how much.

``python -m duo_attn.eval.compare A.json:METHOD B.json:METHOD`` reads the per-sample records that
``duo_attn.eval.synthetic`` writes into ``results.json`` and prints the mean difference of A and B (in string-match
points, averaged over tasks as the suite's average is), a bootstrap confidence interval that resamples the samples
within each task, and how many samples each side won.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def paired_difference(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], *, resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Mean over tasks of A's minus B's per-sample score (x100), its bootstrap interval at ``level`` and the counts.

    Records are matched by (task, length, index); both sides must hold exactly the same samples, and every task
    the same number of them, so that the mean over samples equals the mean over tasks.
    """
    key = lambda r: (r["task"], r["length"], r["index"])  # noqa: E731
    scores_a, scores_b = ({key(r): float(r["score"]) for r in side} for side in (a, b))
    if not scores_a or scores_a.keys() != scores_b.keys():
        raise ValueError("the two runs must score the same, non-empty set of (task, length, sample) records")
    by_task: dict[tuple[str, int], list[float]] = {}
    for k in sorted(scores_a):
        by_task.setdefault(k[:2], []).append(scores_a[k] - scores_b[k])
    rng = random.Random(seed)
    means = sorted(
        100 * sum(sum(rng.choices(d, k=len(d))) / len(d) for d in by_task.values()) / len(by_task)
        for _ in range(resamples)
    )
    tail = int((1 - level) / 2 * resamples)
    differences = [x for d in by_task.values() for x in d]
    return {
        "mean": 100 * sum(sum(d) / len(d) for d in by_task.values()) / len(by_task),
        "low": means[tail],
        "high": means[resamples - 1 - tail],
        "level": level,
        "better": sum(x > 0 for x in differences),
        "worse": sum(x < 0 for x in differences),
        "samples": len(differences),
    }


def _records(spec: str) -> tuple[str, list[dict[str, Any]]]:
    path, _, method = spec.rpartition(":")
    report = json.loads(Path(path).read_text())
    samples = report.get("samples")
    if samples is None:
        raise SystemExit(f"{path} has no per-sample records (written by duo_attn.eval.synthetic since 2026-12-04)")
    if method not in samples:
        raise SystemExit(f"{path} has no method {method!r}; it has {', '.join(samples)}")
    return f"{method} ({path})", samples[method]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="duo-attn compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("a", help="RESULTS.json:METHOD, e.g. runs/synthetic/results.json:duo@0.50")
    parser.add_argument("b", help="RESULTS.json:METHOD to subtract")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--level", type=float, default=0.95)
    args = parser.parse_args(argv)
    (name_a, a), (name_b, b) = _records(args.a), _records(args.b)
    result = paired_difference(a, b, resamples=args.resamples, level=args.level)
    print(f"{name_a} - {name_b}: {result['mean']:+.1f} points, {result['level']:.0%} interval "
          f"[{result['low']:+.1f}, {result['high']:+.1f}]; A better on {result['better']}, worse on "
          f"{result['worse']} of {result['samples']} samples")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
