"""Learn DuoAttention gates: which KV heads need the full context (retrieval) and which do with sink + recent window.

Each (layer, KV head) gets a gate ``a`` in [0, 1]; its query heads output ``a * full + (1 - a) * streaming``
attention. The frozen model's own full-attention hidden states are the teacher: the gates are trained to keep the
final hidden states of the passkey answers unchanged while an L1 penalty pushes every gate towards 0 (streaming).
Heads whose gates stay high are the retrieval heads. Run ``python -m duo_attn.train --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase

from .data import IGNORE_INDEX, PasskeyDataset, encode_haystack, load_haystack
from .masks import allowed_keys
from .models import SMOLLM2, decoder_layers, load_model, load_tokenizer, resolve_device, resolve_dtype, tiny_model
from .patterns import atomic_path, atomic_write_text, save_attn_pattern

TRAIN_ATTENTION = "duo_attn_train"
CHECKPOINT_FILE = "checkpoint.pt"
HEATMAP_FILE = "gates.png"
LOG_FILE = "train_log.jsonl"
TINY_PREFIX = "tiny-"
_CHECKPOINT_VERSION = 1
# Settings that only steer a run (where it writes, when it stops); everything else must match on --resume.
_RUN_CONTROL = ("output_dir", "resume", "checkpoint_every", "stop_after_steps", "max_minutes")


# ----------------------------------------------------------------------------- shared helpers


def supervised_query_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token prediction is supervised (``labels[p + 1] != -100``), as the LM loss shifts.

    These are the queries that must produce the answers; their hidden states are what distillation compares and
    their attention is what the scorer measures.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return mask


def load_model_and_tokenizer(
    name: str, device: torch.device, dtype: torch.dtype, tokenizer_name: str = SMOLLM2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``smollm2``, a local model directory, or ``tiny-<arch>`` (a random tiny model using ``tokenizer_name``'s
    vocabulary, for smoke tests of the whole pipeline)."""
    if name.startswith(TINY_PREFIX):
        tokenizer = load_tokenizer(tokenizer_name)
        model = tiny_model(name[len(TINY_PREFIX) :], seed=seed, vocab_size=len(tokenizer))
        return model.to(device=device, dtype=dtype), tokenizer
    return load_model(name, dtype=dtype, device=device)


def device_description(device: torch.device) -> str:
    """What ran the job, for config.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def run_provenance(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model, hardware and library versions behind a pattern, for its config.json."""
    return {
        "model_type": model.config.model_type,
        "num_layers": model.config.num_hidden_layers,
        "num_kv_heads": model.config.num_key_value_heads,
        "num_attention_heads": model.config.num_attention_heads,
        "resolved_device": str(device),
        "resolved_dtype": str(dtype).removeprefix("torch."),
        "device_name": device_description(device),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def save_gate_heatmap(gates: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """Layers x KV heads picture of a gate or score table; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = np.asarray(gates, dtype=np.float64)
    layers, heads = gates.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * heads + 2.0), max(3.0, 0.22 * layers + 1.5)))
    image = ax.imshow(gates, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="gate (1 = retrieval head)")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- mixed attention


class GateState:
    """The gates and window sizes shared by every layer's attention (a plain object, so the gates never become a
    parameter of the model)."""

    def __init__(self, gates: nn.Parameter, sink_size: int, recent_size: int):
        self.gates, self.sink_size, self.recent_size = gates, sink_size, recent_size
        self.teacher = False
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def streaming_mask(self, length: int, device: torch.device) -> torch.Tensor:
        """``[1, 1, L, L]`` sink + recent rule for positions 0..L-1 (no padding in training), built once per length."""
        key = (length, device)
        if key not in self._masks:
            positions = torch.arange(length, device=device)[None]
            self._masks = {key: allowed_keys(positions, positions, sink_size=self.sink_size, recent_size=self.recent_size)}
        return self._masks[key]

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
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface for training: per KV head ``a * causal + (1 - a) * streaming`` attention.

    ``query [B, H, L, D]``, ``key/value [B, H_kv, L, D]`` of one unpadded sequence; returns ``[B, L, H, D]``.
    """
    state: GateState = module.duo_gate_state
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("duo attention training runs whole sequences without a cache (use_cache=False)")
    gqa = query.shape[1] != key.shape[1]
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    if not state.teacher:
        mask = state.streaming_mask(query.shape[2], query.device)
        streaming = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        gate = state.gates[module.layer_idx].repeat_interleave(query.shape[1] // key.shape[1])
        gate = gate.to(query.dtype)[None, :, None, None]
        full = gate * full + (1 - gate) * streaming
    return full.transpose(1, 2).contiguous(), None


def attach_gates(model: PreTrainedModel, gates: nn.Parameter, sink_size: int, recent_size: int) -> GateState:
    """Switch ``model`` to the mixed attention driven by ``gates [layers, kv_heads]``; returns the shared state."""
    config = model.config
    expected = (config.num_hidden_layers, config.num_key_value_heads)
    if tuple(gates.shape) != expected:
        raise ValueError(f"gates have shape {tuple(gates.shape)}, the model needs {expected}")
    if sink_size < 0 or recent_size < 1:
        raise ValueError(f"need sink_size >= 0 and recent_size >= 1, got {sink_size}, {recent_size}")
    AttentionInterface.register(TRAIN_ATTENTION, mixed_attention_forward)
    state = GateState(gates, sink_size, recent_size)
    for layer in decoder_layers(model):
        layer.self_attn.duo_gate_state = state
    model.set_attn_implementation(TRAIN_ATTENTION)
    return state


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing under either name transformers 5.x uses for it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
class PasskeyRunConfig:
    """Settings training and head scoring share: the model, the streaming window and the passkey data."""

    model: str = SMOLLM2
    tokenizer: str = SMOLLM2
    output_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    sink_size: int = 64  # the shipped SmolLM2 patterns' window; the paper used 128 for 7-8B models
    recent_size: int = 256
    context_length_min: int = 1024
    context_length_max: int = 8192
    context_length_intervals: int = 8
    num_passkeys: int = 10
    passkey_kind: str = "digits"
    passkey_length: int = 5
    haystack: str | None = None
    haystack_max_chars: int | None = None
    seed: int = 42
    # Tells the default pattern directories of different methods apart.
    dir_infix: ClassVar[str] = ""

    def pattern_dir(self) -> Path:
        """``--output-dir``, else ``attn_patterns/<model><dir_infix>-sink<S>-recent<R>``."""
        if self.output_dir:
            return Path(self.output_dir)
        name = Path(self.model.rstrip("/")).name or "model"
        return Path("attn_patterns") / f"{name}{self.dir_infix}-sink{self.sink_size}-recent{self.recent_size}"

    def load_model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.device, torch.dtype]:
        """The model and tokenizer on the resolved device and dtype, which are returned too."""
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        model, tokenizer = load_model_and_tokenizer(self.model, device, dtype, self.tokenizer, self.seed)
        return model, tokenizer, device, dtype

    def passkey_dataset(self, tokenizer: PreTrainedTokenizerBase, num_samples: int) -> PasskeyDataset:
        """``num_samples`` passkey samples drawn as these settings say."""
        haystack = load_haystack(self.haystack, max_chars=self.haystack_max_chars)
        return PasskeyDataset(
            tokenizer,
            encode_haystack(tokenizer, haystack),
            seed=self.seed,
            num_samples=num_samples,
            num_passkeys=self.num_passkeys,
            passkey_kind=self.passkey_kind,
            passkey_length=self.passkey_length,
            min_context=self.context_length_min,
            max_context=self.context_length_max,
            num_intervals=self.context_length_intervals,
        )


ArgumentContainer = argparse.ArgumentParser | argparse._ArgumentGroup


def add_passkey_run_flags(
    defaults: PasskeyRunConfig, model: ArgumentContainer, window: ArgumentContainer, data: ArgumentContainer
) -> None:
    """The flags of `PasskeyRunConfig`, into the given parser or groups; --output-dir and --seed are left to each
    command, whose help for them differs."""
    d = defaults
    model.add_argument("--model", default=d.model,
                       help="'smollm2', a local model directory, or tiny-<arch> (smoke tests)")  # fmt: skip
    model.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer for tiny-<arch> models")
    model.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    model.add_argument("--dtype", default=d.dtype, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    window.add_argument("--sink-size", type=int, default=d.sink_size, help="attention-sink tokens of streaming heads")
    window.add_argument("--recent-size", type=int, default=d.recent_size,
                        help="recent-window tokens of streaming heads")  # fmt: skip
    data.add_argument("--context-length-min", type=int, default=d.context_length_min, help="shortest sample (tokens)")
    data.add_argument("--context-length-max", type=int, default=d.context_length_max, help="longest sample (tokens)")
    data.add_argument("--context-length-intervals", type=int, default=d.context_length_intervals,
                      help="number of evenly spaced context lengths between min and max")  # fmt: skip
    data.add_argument("--num-passkeys", type=int, default=d.num_passkeys, help="passkeys hidden per sample")
    data.add_argument("--passkey-kind", choices=("digits", "words"), default=d.passkey_kind, help="passkey alphabet")
    data.add_argument("--passkey-length", type=int, default=d.passkey_length, help="digits or words per passkey")
    data.add_argument("--haystack", default=d.haystack, help=".txt/.jsonl/.jsonl.zst filler (default: offline text)")
    data.add_argument("--haystack-max-chars", type=int, default=d.haystack_max_chars, help="read at most this much")


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


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain Python only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')!r}")
    return payload


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = dataclasses.asdict(config)
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r} vs now {value!r}"
        for key, value in current.items()
        if key not in _RUN_CONTROL and saved.get(key) != value
    ]
    if diffs:
        raise ValueError(f"{path} was written with different settings; cannot resume:\n  " + "\n  ".join(diffs))


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
) -> dict[str, float]:
    """One optimizer step over ``grad_accum_steps`` samples; the sample indices follow from ``step`` alone."""
    total = distill_sum = 0.0
    tokens = 0
    for micro in range(config.grad_accum_steps):
        sample = dataset[step * config.grad_accum_steps + micro]
        input_ids, labels = sample.input_ids[None].to(device), sample.labels[None].to(device)
        loss, distill = gated_loss(
            model, state, input_ids, labels, config.reg_weight, config.distill_reduction
        )
        (loss / config.grad_accum_steps).backward()
        total += loss.item() / config.grad_accum_steps
        distill_sum += distill.item() / config.grad_accum_steps
        tokens += input_ids.shape[1]
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        state.gates.clamp_(0.0, 1.0)
    return {"step": step + 1, "loss": total, "distill": distill_sum, "mean_gate": state.gates.mean().item(),
            "lr": lr, "tokens": tokens}  # fmt: skip


def train(config: TrainConfig) -> Path | None:
    """Run (or resume) training; returns the pattern directory, or None when stopped early to be resumed."""
    config.check()
    out = config.pattern_dir()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_FILE
    checkpoint = None
    if ckpt_path.exists():
        if not config.resume:
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --output-dir")
        checkpoint = load_checkpoint(ckpt_path)
        _check_resumable(checkpoint["config"], config, ckpt_path)

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer, device, dtype = config.load_model()
    model.requires_grad_(False)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()  # activation checkpointing is active in training mode only; these models have no dropout

    dataset = config.passkey_dataset(tokenizer, config.num_steps * config.grad_accum_steps)

    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    gates = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
    state = attach_gates(model, gates, config.sink_size, config.recent_size)
    optimizer = torch.optim.AdamW([gates], lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * config.num_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, config.num_steps))

    step, elapsed, history = 0, 0.0, []
    if checkpoint is not None:
        with torch.no_grad():
            gates.copy_(checkpoint["gates"].to(device))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"])
        step, elapsed, history = checkpoint["step"], checkpoint["elapsed_s"], checkpoint["history"]

    def checkpoint_now() -> None:
        payload = {
            "version": _CHECKPOINT_VERSION,
            "config": dataclasses.asdict(config),
            "step": step,
            "gates": gates.detach().cpu(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "history": history,
            "elapsed_s": elapsed + (time.perf_counter() - started),
        }
        save_checkpoint(ckpt_path, payload)

    started = time.perf_counter()
    steps_this_run = 0
    bar = tqdm(total=config.num_steps, initial=step, desc="duo-attn gates", dynamic_ncols=True, file=sys.stderr)
    while step < config.num_steps:
        record = _train_step(model, state, dataset, step, config, device, optimizer, scheduler)
        step += 1
        steps_this_run += 1
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", distill=f"{record['distill']:.4f}", gate=f"{record['mean_gate']:.3f}")
        over_time = config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes
        stopping = step < config.num_steps and (over_time or steps_this_run == config.stop_after_steps)
        if step % config.checkpoint_every == 0 or step == config.num_steps or stopping:
            checkpoint_now()
        if stopping:
            bar.close()
            print(f"stopped after step {step} of {config.num_steps}; rerun with --resume to continue", file=sys.stderr)
            return None
    bar.close()
    elapsed += time.perf_counter() - started
    return _write_outputs(out, config, model, gates.detach().cpu().numpy(), history, elapsed, device, dtype)


def _write_outputs(
    out: Path,
    config: TrainConfig,
    model: PreTrainedModel,
    gates: np.ndarray,
    history: Sequence[dict[str, float]],
    elapsed: float,
    device: torch.device,
    dtype: torch.dtype,
) -> Path:
    """Pattern directory (gates + config.json with every setting), heatmap, per-step log."""
    settings = dataclasses.asdict(config)
    for key in _RUN_CONTROL:
        settings.pop(key)
    tail = history[-max(1, len(history) // 10) :]
    info = {
        **settings,
        "method": "duo_attn.train (gate distillation)",
        **run_provenance(model, device, dtype),
        "wall_time_s": round(elapsed, 2),
        "seconds_per_step": round(elapsed / max(1, len(history)), 3),
        "final_loss": float(np.mean([r["loss"] for r in tail])),
        "final_distill": float(np.mean([r["distill"] for r in tail])),
        "mean_gate": float(gates.mean()),
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
    if out is not None:
        print(f"pattern written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
