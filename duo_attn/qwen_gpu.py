"""``duo-attn qwen-gpu``: the Qwen2.5-Coder-0.5B-Instruct run plan for one GPU machine, in three time-budgeted commands.

Why a plan of its own: the GPU machine has no internet and each command there has minutes, not hours. The model
arrives as carried pieces, so ``prepare`` joins and verifies them, converts the GGUF once into a safetensors cache
(``$DUO_ATTN_CACHE``, which ``scripts/qwen_gpu.sh`` points at /tmp for the commands of one session) and checks that
the model answers on the GPU. ``train`` computes the training-free head scores, times real training steps at the
shortest, middle and longest context, picks the step count that fits the budget, trains the gates and writes both
pattern directories (a fixed ``--num-steps`` and ``--resume`` spread a longer run over two calls). ``eval`` runs
the NIAH grid, the held-out passkey grid and the synthetic suite on the patterns, each until its share of the budget
is spent (partial results are still written). Every command bundles what it made into a few files under ``--out``
(the GPU machine returns at most 8 files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tarfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .eval import niah, passkey_grid, synthetic
from .eval.harness import METHOD_KINDS, score_answer
from .eval.passkey_grid import passkey_prompt
from .eval.report import FLOOR_HELP, RANDOM_SEEDS_HELP, floor_arg
from .fetch_qwen import joined_gguf
from .gguf_parts import QWEN25_CODER_GGUF
from .learn.checkpoint import CHECKPOINT_FILE, checkpoint_to_resume, load_checkpoint
from .learn.data import context_length_choices
from .learn.haystack import encode_haystack, load_haystack
from .learn.run import HEATMAP_FILE, LoadedModel, device_description, run_provenance, save_gate_heatmap
from .learn.scoring import ScoreConfig, score_heads
from .bench_train import measure_step_seconds
from .learn.train import RUN_CONTROL, TrainConfig, train
from .models import DTYPES, MODEL_HELP, QWEN25_CODER, export_qwen, load_model
from .patterns import CONFIG_FILE, GATES_FILE, save_attn_pattern

SINK_SIZE, RECENT_SIZE = 128, 256  # the paper's window (its published configs), for training and evaluation alike
LEARNED, SCORE = "learned", "score"  # pattern directories: <kind>-sink<S>-recent<R>, as attn_patterns/ names them
_WRAP_UP_S = 20.0  # kept free at the end of a command for writing, bundling and exiting


# ----------------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def bundle(source: Path, archive: Path) -> Path:
    """``source`` as one gzipped tar (its name as the top folder), so a tree of reports comes back as one file."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return archive


def expected_step_seconds(measured: dict[int, float], lengths: Sequence[int]) -> float:
    """Mean seconds per step when samples are drawn evenly from ``lengths``, interpolating the ``measured``
    (length -> seconds) points linearly. A step's cost grows faster than linearly with the length (attention), so
    between two measured points the line lies above it: the estimate errs towards fewer steps."""
    points = sorted(measured)
    return float(np.mean(np.interp(lengths, points, [measured[p] for p in points])))


def steps_for_budget(seconds: float, step_seconds: float, min_steps: int, max_steps: int) -> int:
    """The step count that fills ``seconds`` at ``step_seconds`` each, within ``[min_steps, max_steps]``."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds}")
    return int(min(max_steps, max(min_steps, math.floor(seconds / step_seconds))))


def pattern_from_checkpoint(config: TrainConfig, loaded: LoadedModel, extra: dict[str, Any]) -> Path:
    """Write the gates of a run that its time limit stopped (they sit in its checkpoint) as a pattern directory,
    marked partial, so that the evaluation can still run on them."""
    out = config.pattern_dir()
    checkpoint = load_checkpoint(out / CHECKPOINT_FILE)
    gates = checkpoint["gates"].numpy()
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL}
    info = {
        **settings, "method": "duo_attn.learn.train (gate distillation), stopped by its time limit",
        **run_provenance(loaded[0], loaded[2], loaded[3]), "partial": True, "completed_steps": checkpoint["step"],
        "wall_time_s": round(checkpoint["elapsed_s"], 2), "mean_gate": float(gates.mean()), **extra,
    }  # fmt: skip
    save_attn_pattern(out, gates, config.sink_size, config.recent_size, info)
    title = f"{QWEN25_CODER} gates after {checkpoint['step']} of {config.num_steps} steps (partial)"
    save_gate_heatmap(gates, out / HEATMAP_FILE, title)
    return out


# ----------------------------------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Join + verify the GGUF, convert it into the safetensors cache, load it on the device and check two answers:
    a chat question and a passkey (``--check-context`` tokens) under full attention."""
    started = time.perf_counter()
    gguf = joined_gguf(args.gguf, args.pieces or ())
    verified = time.perf_counter()
    export_qwen(gguf=gguf)
    converted = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    loaded_at = time.perf_counter()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt.to(model.device), max_new_tokens=8, do_sample=False)
    chat_answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    haystack = encode_haystack(tokenizer, load_haystack(None, max_chars=40 * args.check_context))
    needle = passkey_prompt(tokenizer, haystack, args.check_context, 0.5, "71432")
    passkey = score_answer(model, tokenizer, needle.prompt_ids, needle.answer_ids, answer="71432")
    report = {
        "gguf": str(gguf), "sha256": QWEN25_CODER_GGUF.sha256, "verify_s": round(verified - started, 1),
        "convert_s": round(converted - verified, 1), "load_s": round(loaded_at - converted, 1),
        "chat_answer": chat_answer, "chat_ok": "paris" in chat_answer.lower(),
        "passkey_context": args.check_context, "passkey_generated": passkey.generated,
        "passkey_match": passkey.greedy_match, "passkey_teacher_forced": passkey.teacher_forced_accuracy,
        **run_provenance(model, model.device, model.dtype), "total_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    _write_json(Path(args.out) / "prepare.json", report)
    print(json.dumps(report, indent=2))
    if not (report["chat_ok"] and report["passkey_match"]):
        print("warning: the model did not answer as expected; look at prepare.json before training", file=sys.stderr)
    return report


# ------------------------------------------------------------------------------------------------ train + score


def _calibrate(config: TrainConfig, lengths: list[int], loaded: LoadedModel) -> tuple[TrainConfig, dict[int, float]]:
    """Time steps at ``lengths``; if the longest does not fit in memory without activation checkpointing, measure
    again with it (slower steps, far less memory) and train that way."""
    try:
        return config, measure_step_seconds(config, lengths, loaded)
    except torch.OutOfMemoryError:
        if config.activation_checkpointing:
            raise
        print("out of memory without activation checkpointing: measuring again with it", file=sys.stderr)
        torch.cuda.empty_cache()
        config = dataclasses.replace(config, activation_checkpointing=True)
        return config, measure_step_seconds(config, lengths, loaded)


def _resume_point(config: TrainConfig) -> int | None:
    """The step a ``--resume`` continues from (None: no checkpoint yet, a fresh start). A checkpoint written with
    other settings is refused here, before the model is loaded and the heads are scored."""
    checkpoint = checkpoint_to_resume(config.pattern_dir() / CHECKPOINT_FILE, True, dataclasses.asdict(config),
                                      RUN_CONTROL)  # fmt: skip
    return None if checkpoint is None else int(checkpoint["step"])


def _complete_pattern(directory: Path) -> bool:
    """Whether ``score_heads`` finished writing ``directory`` (its heatmap comes last)."""
    return all((directory / name).is_file() for name in (GATES_FILE, CONFIG_FILE, HEATMAP_FILE))


def train_and_score(args: argparse.Namespace) -> dict[str, Any]:
    """Score heads, calibrate, train within the budget, write both patterns and a summary; bundle them. Patterns of
    an earlier run in ``--work`` are removed first (training would refuse to overwrite a checkpoint).

    ``--resume`` (with the ``--num-steps`` of the first call) keeps them instead: the scores, when complete, are not
    computed again, and the learned run continues from its checkpoint with the same settings, so that the steps,
    learning-rate schedule and samples are those of one uninterrupted run; it stops at the budget again."""
    started = time.perf_counter()
    deadline = started + 60.0 * args.budget_minutes - _WRAP_UP_S
    patterns = Path(args.work) / "patterns"
    if not args.resume:
        shutil.rmtree(patterns, ignore_errors=True)
    suffix = f"-sink{args.sink_size}-recent{args.recent_size}"
    window = {"sink_size": args.sink_size, "recent_size": args.recent_size}
    data = {"context_length_min": args.context_length_min, "context_length_max": args.context_length_max,
            "context_length_intervals": args.context_length_intervals, "num_passkeys": args.num_passkeys}  # fmt: skip
    common = {"model": args.model, "device": args.device, "dtype": args.dtype, **window, **data}
    config = TrainConfig(**common, output_dir=str(patterns / (LEARNED + suffix)), lr=args.lr,
                         reg_weight=args.reg_weight, activation_checkpointing=args.activation_checkpointing,
                         num_steps=args.max_steps if args.num_steps is None else args.num_steps,
                         resume=args.resume)  # fmt: skip
    config.check()
    resumed_from = _resume_point(config) if args.resume else None
    loaded = config.load_model()
    loaded_at = time.perf_counter()

    score_config = ScoreConfig(**common, output_dir=str(patterns / (SCORE + suffix)), num_samples=args.score_samples)
    scores_kept = args.resume and _complete_pattern(score_config.pattern_dir())
    score_dir = score_config.pattern_dir() if scores_kept else score_heads(score_config, loaded)
    scored_at = time.perf_counter()

    lengths = context_length_choices(args.context_length_min, args.context_length_max, args.context_length_intervals)
    measured: dict[int, float] = {}
    if args.num_steps is None:
        probe = sorted({lengths[0], lengths[len(lengths) // 2], lengths[-1]})
        config, measured = _calibrate(config, probe, loaded)
        step_s = expected_step_seconds(measured, lengths)
        num_steps = steps_for_budget(0.9 * (deadline - time.perf_counter()), step_s, args.min_steps, args.max_steps)
    else:
        step_s, num_steps = float("nan"), args.num_steps
    calibrated_at = time.perf_counter()
    config = dataclasses.replace(config, num_steps=num_steps, checkpoint_every=max(1, num_steps // 4),
                                 max_minutes=max(0.1, (deadline - time.perf_counter()) / 60.0))  # fmt: skip
    summary = {
        "load_s": round(loaded_at - started, 1), "score_s": round(scored_at - loaded_at, 1), "scores_kept": scores_kept,
        "resumed_from_step": resumed_from,
        "calibration_s": round(calibrated_at - scored_at, 1),
        "measured_step_s": {str(k): round(v, 3) for k, v in measured.items()},
        "expected_step_s": round(step_s, 3), "num_steps_planned": num_steps,
        "activation_checkpointing": config.activation_checkpointing,
        "device_name": device_description(loaded[2]),
        "score_wall_time_s": json.loads((score_dir / "config.json").read_text())["wall_time_s"],
    }  # fmt: skip
    try:  # a failure must not cost the scores and the gates reached so far
        learned = train(config, loaded)
    except Exception:  # noqa: BLE001 - reported in train_summary.json and on stderr
        summary["error"] = traceback.format_exc()
        print(summary["error"], file=sys.stderr)
        learned = None
    if learned is None and (config.pattern_dir() / CHECKPOINT_FILE).is_file():  # stopped early: keep its gates
        learned = pattern_from_checkpoint(config, loaded, {k: v for k, v in summary.items() if k != "error"})
    if learned is not None:
        info = json.loads((learned / "config.json").read_text())
        summary |= {
            "completed_steps": info.get("completed_steps", info["num_steps"]), "partial": bool(info.get("partial")),
            "train_wall_time_s": info["wall_time_s"], "seconds_per_step": info.get("seconds_per_step"),
            "peak_gpu_memory_gib": info.get("peak_gpu_memory_gib"), "mean_gate": info["mean_gate"],
        }  # fmt: skip
    summary["total_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    _write_json(out / "train_summary.json", summary)
    bundle(patterns, out / "patterns.tar.gz")
    print(json.dumps(summary, indent=2))
    return summary


# -------------------------------------------------------------------------------------------------------- eval


SUITES = ("niah", "grid", "synthetic")


def _suite_argv(args: argparse.Namespace, suite: str, out: Path, minutes: float) -> list[str]:
    """The command line of one suite's own module (`duo_attn.eval.niah`, ``passkey_grid``, ``synthetic``)."""
    fractions = [str(f) for f in args.retrieval_fractions]
    sparsities = [f"{1.0 - f:g}" for f in args.retrieval_fractions]
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--chunk-size",
              str(args.chunk_size), "--output-dir", str(out), "--time-limit-minutes", f"{minutes:.3f}"]  # fmt: skip
    patterns = ["--pattern", str(args.pattern), "--baseline-pattern", str(args.baseline_pattern)]
    kinds = ["--methods", *args.methods, "--min-retrieval-per-layer", str(args.min_retrieval_per_layer),
             "--random-seeds", *map(str, args.random_seeds)]  # fmt: skip
    for flag, value in (("--sink", args.sink), ("--recent", args.recent)):  # only overrides given: else the pattern's
        if value is not None:
            kinds += [flag, str(value)]
    if suite == "niah":
        return [*common, *patterns, *kinds, "--sparsities", *sparsities,
                "--contexts", *map(str, args.niah_contexts), "--depths", *map(str, args.niah_depths)]  # fmt: skip
    if suite == "grid":
        return [*common, *patterns, *kinds, "--retrieval-fractions", *fractions, "--keys-per-cell",
                str(args.keys_per_cell), "--contexts", *map(str, args.grid_contexts),
                "--depths", *map(str, args.grid_depths)]  # fmt: skip
    return [*common, *patterns, *kinds, "--sparsities", *sparsities, "--lengths",
            *map(str, args.synthetic_lengths), "--n-samples", str(args.synthetic_samples),
            "--tasks", *args.synthetic_tasks]  # fmt: skip


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suites in order, each until its share of the budget is spent (time one leaves unused passes on to
    the next), then bundle the reports and concatenate their summaries."""
    started = time.perf_counter()
    end = started + 60.0 * args.budget_minutes - _WRAP_UP_S
    os.environ["DUO_ATTN_FLEX"] = args.flex  # read by duo_attn.kernels.flex at every pre-fill chunk
    shares = np.cumsum([args.shares[SUITES.index(s)] for s in args.suites])
    shares = shares / shares[-1]
    root = Path(args.work) / "eval"
    modules = {"niah": niah.main, "grid": passkey_grid.main, "synthetic": synthetic.main}
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    for suite, share in zip(args.suites, shares):
        suite_started = time.perf_counter()
        minutes = (started + share * (end - started) - suite_started) / 60.0
        if minutes <= 0.1:
            errors[suite] = "skipped: no time left"
            continue
        try:  # one suite failing must not cost the others' results
            modules[suite](_suite_argv(args, suite, root / suite, minutes))
        except Exception:  # noqa: BLE001 - reported in eval_run.json and on stderr, then the next suite runs
            errors[suite] = traceback.format_exc()
            print(errors[suite], file=sys.stderr)
        seconds[suite] = round(time.perf_counter() - suite_started, 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [suite for suite in args.suites if (root / suite / "summary.md").is_file()]
    summaries = [f"<!-- {suite} -->\n" + (root / suite / "summary.md").read_text() for suite in written]
    (out / "eval_summary.md").write_text("\n\n".join(summaries) or "no suite finished\n")
    report = {"seconds": seconds, "errors": errors, "total_s": round(time.perf_counter() - started, 1)}
    _write_json(root / "eval_run.json", report)
    bundle(root, out / "eval.tar.gz")
    print(json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------------------------------------------- the CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn qwen-gpu",
        description="The Qwen2.5-Coder-0.5B-Instruct GPU plan: prepare (verify + convert + check), train (scores, "
        "calibrated gate training), eval (NIAH, passkey grid, synthetic suite), each within a time budget. "
        "docs/qwen.md gives the command sequence.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--model", default=QWEN25_CODER, help=MODEL_HELP)
    shared.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (smoke runs)")
    shared.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    shared.add_argument("--out", required=True, help="where the few files to bring back go (e.g. $OUT)")
    shared.add_argument("--work", default="/tmp/qwen_run", help="where patterns and reports live between commands")

    prep = commands.add_parser("prepare", parents=[shared], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                               help="join + verify the GGUF, convert it, check two answers on the device")
    source = prep.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="the already-joined GGUF (verified)")
    source.add_argument("--pieces", nargs="+", help="the carried pieces, in order (joined, then verified)")
    prep.add_argument("--check-context", type=int, default=4096, help="tokens of the passkey check")

    tr = commands.add_parser("train", parents=[shared], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                             help="training-free scores, then gate training sized to the budget")
    tr.add_argument("--budget-minutes", type=float, default=4.5, help="the whole command, loading included")
    tr.add_argument("--sink-size", type=int, default=SINK_SIZE)
    tr.add_argument("--recent-size", type=int, default=RECENT_SIZE)
    tr.add_argument("--context-length-min", type=int, default=1024)
    tr.add_argument("--context-length-max", type=int, default=32000, help="the paper's longest training context")
    tr.add_argument("--context-length-intervals", type=int, default=8)
    tr.add_argument("--num-passkeys", type=int, default=10, help="passkeys per training / scoring sample")
    tr.add_argument("--lr", type=float, default=0.02)
    tr.add_argument("--reg-weight", type=float, default=0.05)
    tr.add_argument("--num-steps", type=int, help="fixed step count (skips the calibration)")
    tr.add_argument("--min-steps", type=int, default=50, help="fewest steps the calibration may choose")
    tr.add_argument("--max-steps", type=int, default=2000, help="most steps (the paper's count)")
    tr.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute activations (needed only if the longest context does not fit; tried "
                         "automatically after an out-of-memory error in the calibration)")  # fmt: skip
    tr.add_argument("--score-samples", type=int, default=16, help="passkey samples for the training-free scores")
    tr.add_argument("--resume", action="store_true",
                    help="continue the learned run in WORK from its checkpoint (same --num-steps and settings as the "
                         "first call) and keep its scores, instead of starting afresh")  # fmt: skip

    ev = commands.add_parser("eval", parents=[shared], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                             help="NIAH, held-out passkey grid and synthetic suite on the patterns")
    ev.add_argument("--budget-minutes", type=float, default=6.5, help="the whole command, loading included")
    ev.add_argument("--pattern", type=Path, help=f"learned pattern (default: the one WORK/patterns/{LEARNED}-*)")
    ev.add_argument("--baseline-pattern", type=Path,
                    help=f"training-free scores (default: the one WORK/patterns/{SCORE}-*)")  # fmt: skip
    ev.add_argument("--retrieval-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ev.add_argument("--methods", nargs="+", choices=METHOD_KINDS, default=list(METHOD_KINDS),
                    help="method kinds of every suite (a long suite can be split over calls by kind)")  # fmt: skip
    ev.add_argument("--min-retrieval-per-layer", type=floor_arg, default=0, metavar="N",
                    help=f"every suite's floor: {FLOOR_HELP}")  # fmt: skip
    ev.add_argument("--random-seeds", type=int, nargs="+", default=[0], help=f"every suite's {RANDOM_SEEDS_HELP}")
    ev.add_argument("--sink", type=int, help="streaming heads' sink for every suite (default: each pattern's own)")
    ev.add_argument("--recent", type=int,
                    help="streaming heads' recent window for every suite (default: each pattern's own); the gates "
                         "and the head selection stay the pattern's")  # fmt: skip
    ev.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES), help="run in this order")
    ev.add_argument("--shares", type=float, nargs=3, default=[0.42, 0.26, 0.32],
                    help="budget shares of niah, grid, synthetic")  # fmt: skip
    ev.add_argument("--chunk-size", type=int, default=4096, help="pre-fill chunk (tokens)")
    ev.add_argument("--flex", choices=("auto", "never"), default="never",
                    help="FlexAttention for the streaming heads' pre-fill (DUO_ATTN_FLEX). 'never' by default: its "
                         "compiled kernel is specialised to each chunk shape, and prompts of many lengths would make "
                         "it recompile again and again, costing more than it saves on a 0.5B model")  # fmt: skip
    ev.add_argument("--niah-contexts", type=int, nargs="+", default=[32000, 16384, 8192, 4096, 2048],
                    help="run in this order (longest first: a cut-short run keeps the long contexts)")
    ev.add_argument("--niah-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ev.add_argument("--grid-contexts", type=int, nargs="+", default=[16384, 8192])
    ev.add_argument("--grid-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ev.add_argument("--keys-per-cell", type=int, default=2)
    ev.add_argument("--synthetic-lengths", type=int, nargs="+", default=[16384, 8192])
    ev.add_argument("--synthetic-samples", type=int, default=1, help="samples per task and length")
    ev.add_argument("--synthetic-tasks", nargs="+", choices=synthetic.SYNTHETIC_TASKS,
                    default=list(synthetic.SYNTHETIC_TASKS))  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one command of the plan."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args)
    if args.command == "train":
        if args.resume and args.num_steps is None:
            parser.error("--resume needs --num-steps, the first call's: a calibrated step count would change "
                         "between calls, and with it the learning-rate schedule and the samples")  # fmt: skip
        return train_and_score(args)
    patterns = Path(args.work) / "patterns"
    for attr, kind in (("pattern", LEARNED), ("baseline_pattern", SCORE)):
        if getattr(args, attr) is None:
            found = sorted(patterns.glob(f"{kind}-*"))
            if len(found) != 1:
                parser.error(f"expected one {patterns}/{kind}-* pattern, found {len(found)}: run the train command "
                             "first, or pass --pattern / --baseline-pattern")  # fmt: skip
            setattr(args, attr, found[0])
        if not (getattr(args, attr) / "config.json").is_file():
            parser.error(f"{getattr(args, attr)} is not a pattern directory (no config.json)")
    return evaluate(args)


if __name__ == "__main__":
    main()
