"""Gate training: the mixed attention's limits, gradient flow, optimisation, exact resume, and the written pattern."""

from __future__ import annotations

import json
import subprocess
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import requires_smollm2
from torch import nn

import duo_attn.learn.train as train_module
from duo_attn.compat import set_activation_checkpointing
from duo_attn.models import decoder_layers, tiny_model
from duo_attn.patch import SUPPORTED_MODEL_TYPES, disable_duo_attention, enable_duo_attention_eval
from duo_attn.patterns import load_attn_pattern
from duo_attn.learn.checkpoint import CHECKPOINT_FILE, load_checkpoint
from duo_attn.learn.run import HEATMAP_FILE, sink_window_attention, supervised_query_mask
from duo_attn.masks import allowed_keys
from duo_attn.learn.train import (
    TrainConfig,
    _lr_factor,
    attach_gates,
    distillation_loss,
    gated_loss,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SINK, RECENT = 4, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(length: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 256, (1, length), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -10:] = input_ids[:, -10:]
    return input_ids, labels


def _gates(model: nn.Module, value: float | np.ndarray) -> nn.Parameter:
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    return nn.Parameter(torch.tensor(np.broadcast_to(value, shape), dtype=torch.float32))


def _tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    settings = {
        "model": "tiny-llama",
        "output_dir": str(tmp_path / "pattern"),
        "device": "cpu",
        "num_steps": 6,
        "sink_size": 16,
        "recent_size": 32,
        "context_length_min": 200,
        "context_length_max": 240,
        "context_length_intervals": 2,
        "num_passkeys": 2,
        "checkpoint_every": 2,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_gates_at_one_reproduce_full_attention(arch: str) -> None:
    model = tiny_model(arch)
    input_ids, labels = _inputs()
    with torch.no_grad():
        reference = model(input_ids).logits
        state = attach_gates(model, _gates(model, 1.0), SINK, RECENT)
        mixed = model(input_ids, use_cache=False).logits
        loss, distill = gated_loss(model, state, input_ids, labels, reg_weight=0.05)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    assert distill.item() == 0.0
    assert loss.item() == pytest.approx(0.05)


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_binary_gates_match_the_inference_path(arch: str) -> None:
    input_ids, _ = _inputs(length=40)
    trained = tiny_model(arch)
    for mask in (np.zeros((2, 2)), np.array([[1.0, 0.0], [0.0, 1.0]])):
        reference_model = tiny_model(arch)
        enable_duo_attention_eval(reference_model, mask, sink_size=SINK, recent_size=RECENT)
        with torch.no_grad():
            reference = reference_model(input_ids, use_cache=False).logits
            attach_gates(trained, _gates(trained, mask), SINK, RECENT)
            mixed = trained(input_ids, use_cache=False).logits
        disable_duo_attention(reference_model)
        torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)


def test_uninstalling_the_gates_restores_the_model() -> None:
    model = tiny_model("qwen3")
    input_ids, _ = _inputs()
    with torch.no_grad():
        reference = model(input_ids).logits
        attach_gates(model, _gates(model, 1.0), SINK, RECENT)
        state = attach_gates(model, _gates(model, 0.0), SINK, RECENT)  # replaces the first gates
        state.installed.uninstall()
        torch.testing.assert_close(model(input_ids).logits, reference)
    assert model.config._attn_implementation != train_module.TRAIN_ATTENTION
    assert not any(hasattr(layer.self_attn, "duo_gate_state") for layer in decoder_layers(model))
    enable_duo_attention_eval(model, np.ones((2, 2)), sink_size=SINK, recent_size=RECENT)  # no mode left installed


def test_gradients_reach_only_the_gates() -> None:
    model = tiny_model("llama").requires_grad_(False)
    input_ids, labels = _inputs()
    gates = _gates(model, np.array([[0.3, 0.7], [0.5, 0.9]]))
    state = attach_gates(model, gates, SINK, RECENT)
    assert all(p is not gates for p in model.parameters())
    loss, _ = gated_loss(model, state, input_ids, labels, reg_weight=0.0)
    loss.backward()
    plain = gates.grad.clone()
    assert torch.isfinite(plain).all() and (plain != 0).all()
    assert all(p.grad is None for p in model.parameters())

    gates.grad = None
    set_activation_checkpointing(model, True)
    model.train()
    loss, _ = gated_loss(model, state, input_ids, labels, reg_weight=0.0)
    loss.backward()
    torch.testing.assert_close(gates.grad, plain, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_matches_finite_differences() -> None:
    model = tiny_model("qwen2").double()  # RMSNorm still rounds to fp32 inside, hence the wide step below
    input_ids, labels = _inputs()
    gates = nn.Parameter(torch.full((2, 2), 0.5, dtype=torch.float64))
    state = attach_gates(model, gates, SINK, RECENT)
    loss, _ = gated_loss(model, state, input_ids, labels, reg_weight=0.1)
    loss.backward()
    eps = 1e-3
    for index in [(0, 0), (1, 1)]:
        with torch.no_grad():
            gates[index] += eps
            up = gated_loss(model, state, input_ids, labels, 0.1)[0].item()
            gates[index] -= 2 * eps
            down = gated_loss(model, state, input_ids, labels, 0.1)[0].item()
            gates[index] += eps
        assert gates.grad[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(
    ("length", "sink", "recent"),
    [(1, 4, 8), (5, 0, 1), (17, 3, 4), (40, 4, 8), (64, 8, 16), (33, 40, 5), (50, 2, 100)],
)
def test_sink_window_attention_matches_the_dense_rule(length: int, sink: int, recent: int) -> None:
    """The block-wise streaming branch equals masked dense attention, values and gradients, GQA included."""
    generator = torch.Generator().manual_seed(length)
    query = torch.randn(2, 4, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    key, value = (torch.randn(2, 2, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)
                  for _ in range(2))  # fmt: skip
    positions = torch.arange(length)[None]
    mask = allowed_keys(positions, positions, sink_size=sink, recent_size=recent)
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
    )
    blocked = sink_window_attention(query, key, value, 0.3, sink, recent)
    torch.testing.assert_close(blocked, dense)
    weights = torch.randn(dense.shape, dtype=torch.float64, generator=generator)
    expected = torch.autograd.grad((dense * weights).sum(), (query, key, value))
    for got, want in zip(torch.autograd.grad((blocked * weights).sum(), (query, key, value)), expected):
        torch.testing.assert_close(got, want)


def test_distillation_loss_reductions() -> None:
    student = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    teacher = torch.zeros(2, 4)
    assert distillation_loss(student, teacher, "sum").item() == 15.0  # (1 + 4 + 9 + 16 + 0) / 2 positions
    assert distillation_loss(student, teacher, "mean").item() == 3.75  # the same / 4 hidden dims
    assert distillation_loss(student, teacher).item() == 3.75
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, "max")


def test_supervised_positions_are_the_ones_predicting_labels() -> None:
    labels = torch.tensor([-100, -100, 5, 6, -100, 7])
    assert supervised_query_mask(labels).tolist() == [False, True, True, False, True, False]


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [_lr_factor(step, 10, 100) for step in range(100)]
    assert factors[0] > 0 and factors[10] == 1.0
    assert all(a < b for a, b in pairwise(factors[:11]))
    assert all(a > b for a, b in pairwise(factors[10:]))
    assert factors[-1] > 0


@requires_smollm2  # the tiny model borrows SmolLM2's tokenizer for its passkey data
def test_training_lowers_the_loss(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path, num_steps=12, reg_weight=1.0, lr=0.05, warmup_ratio=0.0, checkpoint_every=100)
    out = train(config)
    history = [json.loads(line) for line in (out / train_module.LOG_FILE).read_text().splitlines()]
    losses = [record["loss"] for record in history]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0]
    assert history[-1]["mean_gate"] < 1.0


@requires_smollm2  # the tiny model borrows SmolLM2's tokenizer for its passkey data
def test_clamping_and_written_pattern(tmp_path: Path) -> None:
    # Adam's first step moves every gate by the full learning rate, 1 -> -2 here, which the clamp undoes.
    config = _tiny_config(tmp_path, num_steps=1, reg_weight=5.0, lr=3.0, warmup_ratio=0.0)
    out = train(config)
    gates, sink, recent = load_attn_pattern(out)
    assert gates.shape == (2, 2) and (sink, recent) == (16, 32)
    assert (gates == 0.0).all()
    assert (load_checkpoint(out / CHECKPOINT_FILE)["gates"] == 0.0).all()
    settings = json.loads((out / "config.json").read_text())
    for key in ("lr", "reg_weight", "num_steps", "context_length_min", "context_length_max", "num_passkeys",
                "seed", "grad_accum_steps", "warmup_ratio", "wall_time_s", "device_name", "model"):  # fmt: skip
        assert key in settings
    assert settings["lr"] == 3.0 and settings["reg_weight"] == 5.0 and settings["sink_size"] == 16
    assert (out / HEATMAP_FILE).stat().st_size > 1000


@requires_smollm2  # the tiny model borrows SmolLM2's tokenizer for its passkey data
def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"num_steps": 6, "grad_accum_steps": 2, "lr": 0.1, "reg_weight": 0.5, "checkpoint_every": 2}
    whole = train(_tiny_config(tmp_path / "whole", **settings))
    expected = load_attn_pattern(whole)[0]
    expected_log = (whole / train_module.LOG_FILE).read_text()

    # A graceful stop (time limit / --stop-after-steps) between checkpoints, then --resume.
    stopped_cfg = _tiny_config(tmp_path / "stopped", stop_after_steps=3, **settings)
    assert train(stopped_cfg) is None
    assert load_checkpoint(stopped_cfg.pattern_dir() / CHECKPOINT_FILE)["step"] == 3
    resumed = train(_tiny_config(tmp_path / "stopped", resume=True, **settings))
    np.testing.assert_array_equal(load_attn_pattern(resumed)[0], expected)
    assert (resumed / train_module.LOG_FILE).read_text() == expected_log

    # A hard kill during step 4: only the step-2 checkpoint survives; the resumed run redoes steps 3 and 4.
    real_step, calls = train_module._train_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_config(tmp_path / "killed", **settings))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    killed_dir = tmp_path / "killed" / "pattern"
    assert load_checkpoint(killed_dir / CHECKPOINT_FILE)["step"] == 2
    with pytest.raises(FileExistsError):
        train(_tiny_config(tmp_path / "killed", **settings))
    with pytest.raises(ValueError, match="different settings"):
        train(_tiny_config(tmp_path / "killed", resume=True, **{**settings, "lr": 0.2}))
    resumed = train(_tiny_config(tmp_path / "killed", resume=True, **settings))
    np.testing.assert_array_equal(load_attn_pattern(resumed)[0], expected)
    assert (resumed / train_module.LOG_FILE).read_text() == expected_log


def test_wrapper_script_shows_help() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_train.sh"), "--help"], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--sink-size", "--recent-size", "--reg-weight", "--resume", "--grad-accum-steps", "--context-length-max"):
        assert flag in result.stdout

