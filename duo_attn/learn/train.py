"""Learn DuoAttention gates: which KV heads need the full context (retrieval) and which do with sink + recent window.

Each (layer, KV head) gets a gate ``a`` in [0, 1]; its query heads output ``a * full + (1 - a) * streaming``
attention. The frozen model's own full-attention hidden states are the teacher: the gates are trained to keep the
final hidden states of the passkey answers unchanged while an L1 penalty pushes every gate towards 0 (streaming).
Heads whose gates stay high are the retrieval heads. Run ``python -m duo_attn.learn.train --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..compat import set_activation_checkpointing
from ..models import resolve_device
from ..patch import InstalledAttention
from ..patterns import atomic_write_text, save_attn_pattern
from .checkpoint import CHECKPOINT_FILE, checkpoint_to_resume, rng_state, save_checkpoint, set_rng_state
from .data import PasskeyDataset
from .data_parallel import DataParallel
from .run import (
    HEATMAP_FILE,
    LoadedModel,
    PasskeyRunConfig,
    add_passkey_run_flags,
    install_shared_attention,
    run_provenance,
    save_gate_heatmap,
    sink_window_attention,
    supervised_query_mask,
    whole_sequence_attention,
)

TRAIN_ATTENTION = "duo_attn_train"
LOG_FILE = "train_log.jsonl"
# Settings that only steer a run (where it writes, when it stops); everything else must match on --resume.
RUN_CONTROL = ("output_dir", "resume", "checkpoint_every", "stop_after_steps", "max_minutes")


# ----------------------------------------------------------------------------- mixed attention


class GateState:
    """The gates and window sizes shared by every layer's attention (a plain object, so the gates never become a
    parameter of the model)."""

    def __init__(self, gates: nn.Parameter, sink_size: int, recent_size: int):
        self.gates, self.sink_size, self.recent_size = gates, sink_size, recent_size
        self.teacher = False
        self.installed: InstalledAttention | None = None  # set by `attach_gates`; `installed.uninstall()` undoes it

    @contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """Full attention in every head, whatever the gates: the distillation target."""
        self.teacher = True
        try:
            yield
        finally:
            self.teacher = False


def mixed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface for training: per KV head ``a * causal + (1 - a) * streaming`` attention.

    ``query [B, H, L, D]``, ``key/value [B, H_kv, L, D]`` of one unpadded sequence; returns ``[B, L, H, D]``.
    """
    state: GateState = module.duo_gate_state
    full = whole_sequence_attention(query, key, value, scaling)
    if not state.teacher:
        streaming = sink_window_attention(query, key, value, scaling, state.sink_size, state.recent_size)
        gate = state.gates[module.layer_idx].repeat_interleave(query.shape[1] // key.shape[1])
        gate = gate.to(query.dtype)[None, :, None, None]
        full = gate * full + (1 - gate) * streaming
    return full.transpose(1, 2).contiguous(), None


def attach_gates(model: PreTrainedModel, gates: nn.Parameter, sink_size: int, recent_size: int) -> GateState:
    """Switch ``model`` to the mixed attention driven by ``gates [layers, kv_heads]`` (replacing earlier gates);
    returns the shared state, whose ``installed.uninstall()`` restores the model's own attention."""
    config = model.config
    expected = (config.num_hidden_layers, config.num_key_value_heads)
    if tuple(gates.shape) != expected:
        raise ValueError(f"gates have shape {tuple(gates.shape)}, the model needs {expected}")
    if sink_size < 0 or recent_size < 1:
        raise ValueError(f"need sink_size >= 0 and recent_size >= 1, got {sink_size}, {recent_size}")
    state = GateState(gates, sink_size, recent_size)
    state.installed = install_shared_attention(model, TRAIN_ATTENTION, mixed_attention_forward, "duo_gate_state", state)
    return state


DISTILL_REDUCTIONS = ("mean", "sum")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared error of final hidden states ``[N, hidden]``, averaged over positions; over the hidden dimension it
    is averaged (per-element MSE) or summed (squared L2 distance, ``hidden_size`` times larger).

    The mean is the default because with the summed form the paper's reg_weight 0.05 is far too weak: on SmolLM2
    (hidden 576) the gates stayed at ~0.99 after 300 steps, while with the mean they separated into clear retrieval
    and streaming heads.
    """
    squared = (student.float() - teacher.float()).pow(2)
    if reduction not in DISTILL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DISTILL_REDUCTIONS}, got {reduction!r}")
    return (squared.sum(-1) if reduction == "sum" else squared.mean(-1)).mean()


def gated_loss(
    model: PreTrainedModel,
    state: GateState,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    reg_weight: float,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distillation + reg_weight * mean |gates|, distillation)`` for one sequence ``[1, L]``."""
    positions = supervised_query_mask(labels)
    if not positions.any():
        raise ValueError("the sample has no supervised positions (labels are all -100)")
    base = model.base_model
    with torch.no_grad(), state.teacher_mode():
        teacher = base(input_ids=input_ids, use_cache=False).last_hidden_state[positions]
    student = base(input_ids=input_ids, use_cache=False).last_hidden_state[positions]
    distill = distillation_loss(student, teacher, reduction)
    return distill + reg_weight * state.gates.abs().mean(), distill


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class TrainConfig(PasskeyRunConfig):
    """Every setting of a training run; all are CLI flags and all end up in the pattern's config.json."""

    num_steps: int = 2000
    grad_accum_steps: int = 1
    lr: float = 0.02
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    reg_weight: float = 0.05
    distill_reduction: str = "mean"
    activation_checkpointing: bool = True
    checkpoint_every: int = 50
    resume: bool = False
    stop_after_steps: int | None = None
    max_minutes: float | None = None

    def check(self) -> None:
        """Fail before loading anything when a setting is out of range."""
        positive = ("num_steps", "grad_accum_steps", "checkpoint_every", "recent_size", "num_passkeys")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.distill_reduction not in DISTILL_REDUCTIONS:
            raise ValueError(f"distill_reduction must be one of {DISTILL_REDUCTIONS}, got {self.distill_reduction!r}")
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError(f"need lr > 0 and reg_weight >= 0, got {self.lr}, {self.reg_weight}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"stop_after_steps must be >= 1, got {self.stop_after_steps}")


def build_parser() -> argparse.ArgumentParser:
    """CLI flags mirror `TrainConfig` one to one."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="duo-attn train",
        description="Learn DuoAttention gates (retrieval vs streaming KV heads) by distillation on synthetic "
        "multi-passkey data. Writes a pattern directory for load_attn_pattern / enable_duo_attention_eval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model")
    window = p.add_argument_group("attention pattern")
    opt = p.add_argument_group("optimisation")
    data = p.add_argument_group("data")
    run = p.add_argument_group("run control")
    add_passkey_run_flags(d, model, window, data)
    model.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                       help="keep all activations (faster, more memory)")  # fmt: skip
    opt.add_argument("--num-steps", type=int, default=d.num_steps, help="optimizer steps")
    opt.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps, help="samples per optimizer step")
    opt.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    opt.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                     help="linear warm-up share, then linear decay")  # fmt: skip
    opt.add_argument("--reg-weight", type=float, default=d.reg_weight, help="weight of the mean |gate| penalty")
    opt.add_argument("--distill-reduction", choices=DISTILL_REDUCTIONS, default=d.distill_reduction,
                     help="squared hidden-state error over the hidden dimension: mean (per-element MSE) or sum "
                          "(squared L2; needs a ~hidden_size times larger --reg-weight)")  # fmt: skip
    opt.add_argument("--seed", type=int, default=d.seed, help="data and RNG seed")
    run.add_argument("--output-dir", default=d.output_dir,
                     help="pattern directory (default attn_patterns/<model>-sink<S>-recent<R>)")  # fmt: skip
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from the output directory's checkpoint if any")
    run.add_argument("--stop-after-steps", type=int, default=d.stop_after_steps,
                     help="checkpoint and exit after this many steps in this invocation (resume later)")  # fmt: skip
    run.add_argument("--max-minutes", type=float, default=d.max_minutes,
                     help="checkpoint and exit once this invocation has run this long (resume later)")  # fmt: skip
    return p


# ----------------------------------------------------------------------------- training loop


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over ``warmup`` steps, then linear decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _train_step(
    model: PreTrainedModel,
    state: GateState,
    dataset: PasskeyDataset,
    step: int,
    config: TrainConfig,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ranks: DataParallel,
) -> dict[str, float]:
    """One optimizer step over ``grad_accum_steps`` samples, the global batch, shared among the data-parallel ranks;
    the sample indices follow from ``step`` alone."""
    total = distill_sum = 0.0
    tokens = 0
    for micro in ranks.share(config.grad_accum_steps):
        sample = dataset[step * config.grad_accum_steps + micro]
        input_ids, labels = sample.input_ids[None].to(device), sample.labels[None].to(device)
        loss, distill = gated_loss(
            model, state, input_ids, labels, config.reg_weight, config.distill_reduction
        )
        (loss / config.grad_accum_steps).backward()
        total += loss.item() / config.grad_accum_steps
        distill_sum += distill.item() / config.grad_accum_steps
        tokens += input_ids.shape[1]
    ranks.sum_gradient(state.gates)
    total, distill_sum, tokens = ranks.sum_values([total, distill_sum, tokens])
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        state.gates.clamp_(0.0, 1.0)
    return {"step": step + 1, "loss": total, "distill": distill_sum, "mean_gate": state.gates.mean().item(),
            "lr": lr, "tokens": int(tokens)}  # fmt: skip


def prepare_for_training(model: PreTrainedModel, activation_checkpointing: bool) -> None:
    """Frozen, in training mode (where activation checkpointing acts), checkpointing as asked."""
    model.requires_grad_(False)
    if activation_checkpointing:
        set_activation_checkpointing(model, True)
    model.train()  # activation checkpointing is active in training mode only; these models have no dropout


def train(config: TrainConfig, loaded: LoadedModel | None = None) -> Path | None:
    """Run (or resume) training; returns the pattern directory, or None when stopped early to be resumed.
    ``loaded``: the model already loaded as ``config`` says (`PasskeyRunConfig.load_model`), else it is loaded.

    Under ``torchrun`` the ranks share each step's samples (data parallelism, learn/data_parallel.py) and rank 0
    alone writes checkpoints and outputs; the result is that of one process on the same samples."""
    config.check()
    ranks = DataParallel.from_environment(resolve_device(config.device) if loaded is None else loaded[2])
    try:
        return _train(config, loaded, ranks)
    finally:
        ranks.close()


def _train(config: TrainConfig, loaded: LoadedModel | None, ranks: DataParallel) -> Path | None:
    if ranks.world_size > config.grad_accum_steps:
        raise ValueError(
            f"{ranks.world_size} data-parallel ranks need at least as many samples per step: --grad-accum-steps "
            f"(the global batch, shared among the ranks) is {config.grad_accum_steps}"
        )
    out = config.pattern_dir()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_to_resume(out / CHECKPOINT_FILE, config.resume, dataclasses.asdict(config), RUN_CONTROL)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer, device, dtype = config.load_model(ranks.device) if loaded is None else loaded
    prepare_for_training(model, config.activation_checkpointing)
    dataset = config.passkey_dataset(tokenizer, config.num_steps * config.grad_accum_steps)
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    gates = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
    state = attach_gates(model, gates, config.sink_size, config.recent_size)
    try:
        progress = _optimise(model, state, dataset, config, device, checkpoint, out / CHECKPOINT_FILE, ranks)
    finally:
        state.installed.uninstall()
    if progress is None:
        return None
    history, elapsed = progress
    if ranks.is_main:
        info = {"data_parallel_ranks": ranks.world_size}
        _write_outputs(out, config, model, gates.detach().cpu().numpy(), history, elapsed, device, dtype, info)
    return out


def _optimise(
    model: PreTrainedModel,
    state: GateState,
    dataset: PasskeyDataset,
    config: TrainConfig,
    device: torch.device,
    checkpoint: dict[str, Any] | None,
    checkpoint_path: Path,
    ranks: DataParallel,
) -> tuple[list[dict[str, float]], float] | None:
    """The optimisation loop, from ``checkpoint`` when given; returns ``(history, seconds)`` once all steps are
    done, None when stopped early (time limit, --stop-after-steps) after checkpointing (by rank 0)."""
    gates = state.gates
    optimizer = torch.optim.AdamW([gates], lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * config.num_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, config.num_steps))
    step, elapsed, history = 0, 0.0, []
    if checkpoint is not None:
        with torch.no_grad():
            gates.copy_(checkpoint["gates"].to(device))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        step, elapsed, history = checkpoint["step"], checkpoint["elapsed_s"], checkpoint["history"]
    started = time.perf_counter()
    steps_this_run = 0
    bar = tqdm(total=config.num_steps, initial=step, desc="duo-attn gates", dynamic_ncols=True, file=sys.stderr,
               disable=not ranks.is_main)  # fmt: skip
    while step < config.num_steps:
        record = _train_step(model, state, dataset, step, config, device, optimizer, scheduler, ranks)
        step += 1
        steps_this_run += 1
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", distill=f"{record['distill']:.4f}", gate=f"{record['mean_gate']:.3f}")
        limit_s = None if config.max_minutes is None else 60 * config.max_minutes
        over_time = limit_s is not None and ranks.any(time.perf_counter() - started > limit_s)  # stop together
        stopping = step < config.num_steps and (over_time or steps_this_run == config.stop_after_steps)
        if ranks.is_main and (step % config.checkpoint_every == 0 or step == config.num_steps or stopping):
            save_checkpoint(checkpoint_path, {
                "config": dataclasses.asdict(config), "step": step, "gates": gates.detach().cpu(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "history": history, "elapsed_s": elapsed + (time.perf_counter() - started),
            })  # fmt: skip
        if stopping:
            bar.close()
            if ranks.is_main:
                print(f"stopped after step {step} of {config.num_steps}; rerun with --resume to continue",
                      file=sys.stderr)  # fmt: skip
            return None
    bar.close()
    return history, elapsed + time.perf_counter() - started


def _write_outputs(
    out: Path,
    config: TrainConfig,
    model: PreTrainedModel,
    gates: np.ndarray,
    history: Sequence[dict[str, float]],
    elapsed: float,
    device: torch.device,
    dtype: torch.dtype,
    run_info: dict[str, Any],
) -> Path:
    """Pattern directory (gates + config.json with every setting and ``run_info``), heatmap, per-step log."""
    settings = dataclasses.asdict(config)
    for key in RUN_CONTROL:
        settings.pop(key)
    tail = history[-max(1, len(history) // 10) :]
    info = {
        **settings,
        "method": "duo_attn.learn.train (gate distillation)",
        **run_provenance(model, device, dtype),
        "wall_time_s": round(elapsed, 2),
        "seconds_per_step": round(elapsed / max(1, len(history)), 3),
        "final_loss": float(np.mean([r["loss"] for r in tail])),
        "final_distill": float(np.mean([r["distill"] for r in tail])),
        "mean_gate": float(gates.mean()),
        **run_info,
    }
    if device.type == "cuda":
        info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    save_attn_pattern(out, gates, config.sink_size, config.recent_size, info)
    title = f"{Path(config.model).name} gates (sink {config.sink_size}, recent {config.recent_size})"
    save_gate_heatmap(gates, out / HEATMAP_FILE, title)
    atomic_write_text(out / LOG_FILE, "".join(json.dumps(record) + "\n" for record in history))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    out = train(config)
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"pattern written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
