"""The Qwen GPU plan's commands, end to end on tiny models on the CPU: budgets, partial results, bundles."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import byte_level_tokenizer, requires_smollm2

from duo_attn import qwen_gpu
from duo_attn.eval import niah, passkey_grid, synthetic
from duo_attn.learn.checkpoint import CHECKPOINT_FILE, load_checkpoint
from duo_attn.learn.haystack import load_haystack
from duo_attn.learn.train import TrainConfig, train
from duo_attn.models import tiny_model
from duo_attn.patterns import load_attn_pattern, save_attn_pattern

pytestmark = pytest.mark.usefixtures("one_thread")
PATTERN_FILES = {"config.json", "full_attention_heads.tsv", "gates.png"}


def _members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return set(tar.getnames())


def test_step_count_fills_the_budget_from_the_measured_steps():
    measured = {1000: 1.0, 3000: 3.0}
    assert qwen_gpu.expected_step_seconds(measured, [1000, 2000, 3000]) == pytest.approx(2.0)
    assert qwen_gpu.expected_step_seconds({1000: 1.0}, [1000]) == 1.0
    assert qwen_gpu.steps_for_budget(30.0, 2.0, 10, 100) == 15
    assert qwen_gpu.steps_for_budget(300.0, 2.0, 10, 100) == 100
    assert qwen_gpu.steps_for_budget(5.0, 2.0, 10, 100) == 10
    with pytest.raises(ValueError):
        qwen_gpu.steps_for_budget(5.0, 0.0, 1, 2)


def test_eval_runs_every_suite_and_bundles_the_reports(tmp_path: Path):
    tokenizer = byte_level_tokenizer([load_haystack(max_chars=20_000)], 600, chatml=True)
    model_dir, work, out = tmp_path / "model", tmp_path / "work", tmp_path / "out"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    gates = np.random.default_rng(0).random((2, 2))
    save_attn_pattern(work / "patterns" / "learned-sink4-recent8", gates, 4, 8)
    save_attn_pattern(work / "patterns" / "score-sink4-recent8", 1.0 - gates, 4, 8)
    qwen_gpu.main([
        "eval", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--out", str(out),
        "--work", str(work), "--retrieval-fractions", "0.5", "--chunk-size", "64", "--niah-contexts", "128", "96",
        "--niah-depths", "0.5", "--grid-contexts", "96", "--grid-depths", "0.5", "--keys-per-cell", "1",
        "--synthetic-lengths", "300", "--synthetic-tasks", "niah_single", "--budget-minutes", "5",
    ])  # fmt: skip
    names = _members(out / "eval.tar.gz")
    for suite in qwen_gpu.SUITES:
        assert {f"eval/{suite}/summary.md", f"eval/{suite}/results.json"} <= names
    methods = ["full", "duo@0.50", "baseline@0.50", "random@0.50", "streaming"]
    niah = json.loads((work / "eval" / "niah" / "results.json").read_text())
    assert [m["name"] for m in niah["methods"]] == methods and len(niah["records"]) == 2 * len(methods)
    assert [r["context_length"] for r in niah["records"][:2]] == [128, 128]  # the contexts in the order given
    assert niah["config"]["sink_size"] == 4 and niah["config"]["cells_done"] == niah["config"]["cells_planned"]
    assert set(json.loads((work / "eval" / "synthetic" / "results.json").read_text())["scores"]) == set(methods)
    summary = (out / "eval_summary.md").read_text()
    assert "Needle in a haystack" in summary and "Held-out passkey grid" in summary and "Synthetic suite" in summary
    assert sorted(p.name for p in out.iterdir()) == ["eval.tar.gz", "eval_summary.md"]


def test_eval_runs_only_the_method_kinds_asked_for(tmp_path: Path):
    tokenizer = byte_level_tokenizer([load_haystack(max_chars=20_000)], 600, chatml=True)
    model_dir, work, out = tmp_path / "model", tmp_path / "work", tmp_path / "out"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_attn_pattern(work / "patterns" / "learned-sink4-recent8", np.random.default_rng(0).random((2, 2)), 4, 8)
    save_attn_pattern(work / "patterns" / "score-sink4-recent8", np.random.default_rng(1).random((2, 2)), 4, 8)
    qwen_gpu.main([
        "eval", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--out", str(out),
        "--work", str(work), "--suites", "synthetic", "--methods", "random", "streaming", "--retrieval-fractions",
        "0.25", "0.5", "--synthetic-lengths", "300", "--synthetic-tasks", "niah_single", "--chunk-size", "64",
    ])  # fmt: skip
    scores = json.loads((work / "eval" / "synthetic" / "results.json").read_text())["scores"]
    assert list(scores) == ["random@0.75", "random@0.50", "streaming"]  # named by sparsity
    assert all(by_length for by_task in scores.values() for by_length in by_task.values())


def _eval_args(*flags: str) -> argparse.Namespace:
    """The eval command's arguments as `evaluate` hands them to `_suite_argv` (patterns resolved)."""
    args = qwen_gpu._build_parser().parse_args(["eval", "--out", "o", *flags])
    args.pattern, args.baseline_pattern = Path("learned"), Path("score")
    return args


def test_eval_forwards_the_floor_to_every_suite():
    args, default = _eval_args("--min-retrieval-per-layer", "1"), _eval_args()
    for suite, module in (("niah", niah), ("grid", passkey_grid), ("synthetic", synthetic)):
        argv = qwen_gpu._suite_argv(args, suite, Path("out"), 1.0)
        assert argv[argv.index("--min-retrieval-per-layer") + 1] == "1"
        assert module._build_parser().parse_args(argv).min_retrieval_per_layer == 1  # each suite takes the flag
        argv = qwen_gpu._suite_argv(default, suite, Path("out"), 1.0)
        assert module._build_parser().parse_args(argv).min_retrieval_per_layer == 0


def test_eval_forwards_the_random_seeds_to_every_suite():
    args, default = _eval_args("--random-seeds", "0", "5", "7"), _eval_args()
    for suite, module in (("niah", niah), ("grid", passkey_grid), ("synthetic", synthetic)):
        assert module._build_parser().parse_args(qwen_gpu._suite_argv(args, suite, Path("out"), 1.0)).random_seeds == [0, 5, 7]
        assert module._build_parser().parse_args(qwen_gpu._suite_argv(default, suite, Path("out"), 1.0)).random_seeds == [0]


def test_eval_forwards_a_window_override_to_every_suite_and_none_by_default():
    args, default = _eval_args("--recent", "1024"), _eval_args()
    for suite, module in (("niah", niah), ("grid", passkey_grid), ("synthetic", synthetic)):
        parsed = module._build_parser().parse_args(qwen_gpu._suite_argv(args, suite, Path("out"), 1.0))
        assert (parsed.recent, parsed.sink) == (1024, None)  # only what was given; the sink stays the pattern's
        parsed = module._build_parser().parse_args(qwen_gpu._suite_argv(default, suite, Path("out"), 1.0))
        assert (parsed.recent, parsed.sink) == (None, None)


def test_eval_without_a_pattern_says_which_command_comes_first(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        qwen_gpu.main(["eval", "--out", str(tmp_path), "--work", str(tmp_path / "empty")])
    assert "found 0: run the train command first" in capsys.readouterr().err


@requires_smollm2  # the tiny model borrows SmolLM2's tokenizer for its passkey data
def test_train_scores_calibrates_trains_and_bundles(tmp_path: Path):
    work, out = tmp_path / "work", tmp_path / "out"
    summary = qwen_gpu.main([
        "train", "--model", "tiny-qwen2", "--device", "cpu", "--dtype", "float32", "--out", str(out),
        "--work", str(work), "--sink-size", "16", "--recent-size", "32", "--context-length-min", "200",
        "--context-length-max", "300", "--context-length-intervals", "3", "--num-passkeys", "2", "--score-samples", "2",
        "--min-steps", "2", "--max-steps", "3", "--budget-minutes", "3",
    ])  # fmt: skip
    assert set(summary["measured_step_s"]) == {"200", "250", "300"} and summary["num_steps_planned"] in (2, 3)
    assert summary["completed_steps"] == summary["num_steps_planned"] and not summary["partial"]
    names = _members(out / "patterns.tar.gz")
    for pattern in ("learned-sink16-recent32", "score-sink16-recent32"):
        assert {f"patterns/{pattern}/{name}" for name in PATTERN_FILES} <= names
    gates, sink, recent = load_attn_pattern(work / "patterns" / "learned-sink16-recent32")
    assert gates.shape == (2, 2) and (sink, recent) == (16, 32)
    assert json.loads((out / "train_summary.json").read_text())["train_wall_time_s"] > 0


@requires_smollm2
def test_a_run_stopped_by_its_time_limit_still_leaves_a_pattern(tmp_path: Path):
    config = TrainConfig(model="tiny-qwen2", device="cpu", output_dir=str(tmp_path / "learned"), num_steps=4,
                         stop_after_steps=2, sink_size=16, recent_size=32, context_length_min=200,
                         context_length_max=240, context_length_intervals=2, num_passkeys=2)  # fmt: skip
    loaded = config.load_model()
    assert train(config, loaded) is None
    out = qwen_gpu.pattern_from_checkpoint(config, loaded, {"note": "kept"})
    info = json.loads((out / "config.json").read_text())
    assert info["partial"] and info["completed_steps"] == 2 and info["num_steps"] == 4 and info["note"] == "kept"
    assert PATTERN_FILES <= {p.name for p in out.iterdir()}


TRAIN_FLAGS = [
    "train", "--model", "tiny-qwen2", "--device", "cpu", "--dtype", "float32", "--sink-size", "16", "--recent-size",
    "32", "--context-length-min", "200", "--context-length-max", "240", "--context-length-intervals", "2",
    "--num-passkeys", "2", "--score-samples", "2", "--budget-minutes", "3",
]  # fmt: skip


@requires_smollm2
def test_train_resumed_after_its_time_limit_ends_as_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    """10 steps (warm-up 1, a checkpoint every 2): the first call's time limit stops it after step 1, between two
    checkpoints; the second call, with --resume, goes on to step 10 and must land on the gates of one run."""
    flags = [*TRAIN_FLAGS, "--num-steps", "10"]
    whole = qwen_gpu.main([*flags, "--out", str(tmp_path / "out-whole"), "--work", str(tmp_path / "whole")])
    assert whole["completed_steps"] == 10 and not whole["partial"] and whole["resumed_from_step"] is None

    work = tmp_path / "split"
    real_train = qwen_gpu.train
    with monkeypatch.context() as patch:  # the budget runs out at once: the limit stops the run after one step
        patch.setattr(qwen_gpu, "train", lambda config, loaded: real_train(
            dataclasses.replace(config, max_minutes=0.0), loaded))  # fmt: skip
        first = qwen_gpu.main([*flags, "--out", str(tmp_path / "out-1"), "--work", str(work)])
    assert first["completed_steps"] == 1 and first["partial"]
    learned, score = work / "patterns" / "learned-sink16-recent32", work / "patterns" / "score-sink16-recent32"
    assert load_checkpoint(learned / CHECKPOINT_FILE)["step"] == 1  # written by the stop, not by checkpoint_every
    scores = (score / "config.json").read_text()

    with pytest.raises(ValueError, match="num_steps: checkpoint 10 vs now 12"):  # before anything is loaded
        qwen_gpu.main([*TRAIN_FLAGS, "--num-steps", "12", "--resume", "--out", str(tmp_path / "x"),
                       "--work", str(work)])  # fmt: skip

    second = qwen_gpu.main([*flags, "--resume", "--out", str(tmp_path / "out-2"), "--work", str(work)])
    assert second["completed_steps"] == 10 and not second["partial"]
    assert second["resumed_from_step"] == 1 and second["scores_kept"] and not whole["scores_kept"]
    assert (score / "config.json").read_text() == scores  # not scored again
    resumed = load_attn_pattern(learned)[0]
    np.testing.assert_array_equal(resumed, load_attn_pattern(tmp_path / "whole" / "patterns" / learned.name)[0])
    assert not np.all(resumed == 1.0)  # the gates moved: the comparison is not vacuous
    logs = [[json.loads(line) for line in (root / "patterns" / learned.name / "train_log.jsonl").open()]
            for root in (work, tmp_path / "whole")]  # fmt: skip
    assert [r["step"] for r in logs[0]] == list(range(1, 11))
    for split, one in zip(*logs):  # the same samples and learning rates, step by step
        assert (split["lr"], split["tokens"], split["loss"]) == (one["lr"], one["tokens"], one["loss"])
    assert f"patterns/{learned.name}/full_attention_heads.tsv" in _members(tmp_path / "out-2" / "patterns.tar.gz")


def test_resume_needs_the_step_count(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        qwen_gpu.main([*TRAIN_FLAGS, "--resume", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    assert "--resume needs --num-steps" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
