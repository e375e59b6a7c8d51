"""What gate training costs on one GPU: step time and peak memory of the training step (`duo_attn.learn.train`'s:
teacher forward, gated forward, backward, AdamW on the gates) for a model shape with random bf16 weights, at several
context lengths, with and without activation checkpointing. A point that runs out of memory is reported as OOM, so
the table says what fits on one GPU and what needs several (data parallelism does not shrink a sample).
`measure_step_seconds` times a configured run's own model and samples, to size a run to a time budget.

    python -m duo_attn.bench_train --help
    python -m duo_attn.bench_train --shape llama3-8b --contexts 8192 16384 32768   # one H200: a few minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from .bench import SHAPES
from .compat import set_activation_checkpointing
from .learn.data import build_passkey_sample
from .learn.haystack import encode_haystack, load_haystack
from .learn.run import LoadedModel, device_description
from .learn.train import GateState, TrainConfig, attach_gates, gated_loss, prepare_for_training
from .models import resolve_device, tiny_config

TINY_SHAPE = "tiny"  # a 2-layer Llama for smoke tests of this script on a CPU
SUPERVISED_TOKENS = 32  # the answer tail whose hidden states are distilled (a passkey answer is about this long)


@dataclass
class StepCost:
    """One measured point; ``step_s`` and ``peak_gib`` are None when it ran out of memory."""

    context: int
    checkpointing: bool
    step_s: float | None
    peak_gib: float | None

    @property
    def oom(self) -> bool:
        return self.step_s is None


def shape_config(shape: str) -> PreTrainedConfig:
    """The config of a benchmark shape (duo_attn.bench.SHAPES) or of the tiny smoke-test model."""
    return tiny_config("llama") if shape == TINY_SHAPE else SHAPES[shape]()


def frozen_model(config: PreTrainedConfig, device: torch.device) -> PreTrainedModel:
    """Random bf16 weights on ``device``, frozen, in training mode (where activation checkpointing acts)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    prepare_for_training(model, activation_checkpointing=False)
    return model


def measure_step(
    model: PreTrainedModel, state: GateState, context: int, steps: int, warmup: int, device: torch.device
) -> tuple[float, float | None]:
    """Median seconds of ``steps`` training steps on one random sequence of ``context`` tokens (after ``warmup``
    unmeasured ones) and the peak GiB allocated on a GPU (None elsewhere); raises torch.OutOfMemoryError."""
    optimizer = torch.optim.AdamW([state.gates], lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(context)
    input_ids = torch.randint(0, model.config.vocab_size, (1, context), device=device, generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -SUPERVISED_TOKENS:] = input_ids[:, -SUPERVISED_TOKENS:]
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        loss, _ = gated_loss(model, state, input_ids, labels, reg_weight=0.05)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            state.gates.clamp_(0.0, 1.0)
        _synchronize(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times[warmup:]), peak


def measure_step_seconds(config: TrainConfig, lengths: Sequence[int], loaded: LoadedModel) -> dict[int, float]:
    """Seconds one training step (teacher pass, gated pass, backward) takes at each context length, timed on the
    model itself with throwaway gates after one warm-up step per length: turns a time budget into a step count
    before a run starts, where nothing else can say how fast this model, GPU and library versions are."""
    model, tokenizer, device, _ = loaded
    prepare_for_training(model, config.activation_checkpointing)
    haystack = encode_haystack(tokenizer, load_haystack(config.haystack, max_chars=config.haystack_max_chars))
    gates = nn.Parameter(torch.ones(model.config.num_hidden_layers, model.config.num_key_value_heads, device=device))
    state = attach_gates(model, gates, config.sink_size, config.recent_size)
    seconds = {}
    try:
        for length in lengths:
            sample = build_passkey_sample(
                tokenizer, haystack, length, random.Random(length), num_passkeys=config.num_passkeys,
                passkey_kind=config.passkey_kind, passkey_length=config.passkey_length,
            )  # fmt: skip
            input_ids, labels = sample.input_ids[None].to(device), sample.labels[None].to(device)
            for timed in (False, True):
                _synchronize(device)
                started = time.perf_counter()
                gated_loss(model, state, input_ids, labels, config.reg_weight, config.distill_reduction)[0].backward()
                _synchronize(device)
                if timed:
                    seconds[length] = time.perf_counter() - started
            gates.grad = None
    finally:
        state.installed.uninstall()
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    shape: str, contexts: Sequence[int], checkpointing: Sequence[bool], steps: int, warmup: int, device: torch.device
) -> list[StepCost]:
    """Every (checkpointing, context) point on one model, the gates attached once."""
    config = shape_config(shape)
    model = frozen_model(config, device)
    gates = nn.Parameter(torch.ones(config.num_hidden_layers, config.num_key_value_heads, device=device))
    state = attach_gates(model, gates, sink_size=128, recent_size=256)  # the paper's 7-8B window
    points = []
    try:
        for enabled in checkpointing:
            set_activation_checkpointing(model, enabled)
            for context in contexts:
                try:
                    step_s, peak = measure_step(model, state, context, steps, warmup, device)
                    points.append(StepCost(context, enabled, step_s, peak))
                except torch.OutOfMemoryError:
                    points.append(StepCost(context, enabled, None, None))
                gates.grad = None
                gc.collect()  # the failed step's tensors, freed before the next point
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        state.installed.uninstall()
    return points


def markdown(points: Sequence[StepCost], header: str) -> str:
    """The points as one table: context, checkpointing, seconds per step, tokens per second, peak memory."""
    lines = [header, "", "| context | activation checkpointing | step (s) | tokens/s | peak memory (GiB) |",
             "|---:|---|---:|---:|---:|"]  # fmt: skip
    for p in points:
        if p.oom:
            cells = ["OOM", "–", "OOM"]
        else:
            peak = "– (no GPU)" if p.peak_gib is None else f"{p.peak_gib:.1f}"
            cells = [f"{p.step_s:.2f}", f"{p.context / p.step_s:,.0f}", peak]
        lines.append(" | ".join(["", f"{p.context:,}", "on" if p.checkpointing else "off", *cells, ""]).strip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="duo-attn bench-train",
        description="Gate-training step time and peak memory for a model shape with random weights, with and "
        "without activation checkpointing; out-of-memory points are reported as OOM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=[*SHAPES, TINY_SHAPE], default="llama3-8b", help="model shape")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768], help="tokens per sample")
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both", help="activation checkpointing")
    p.add_argument("--steps", type=int, default=2, help="measured steps per point (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per point first")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cuda, cuda:1, cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the points and the setting to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: measure, print the markdown table, optionally save JSON."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or min(args.contexts) <= SUPERVISED_TOKENS:
        raise SystemExit(f"need --steps >= 1, --warmup >= 0 and contexts longer than {SUPERVISED_TOKENS} tokens")
    device = resolve_device(args.device)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    points = run(args.shape, args.contexts, modes, args.steps, args.warmup, device)
    header = (
        f"Gate training, {args.shape} shape (random bf16 weights), one sample per step, median of {args.steps} "
        f"steps after {args.warmup}: {device_description(device)}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}"
    )
    print(markdown(points, header))
    if args.json is not None:
        setting = {**vars(args), "json": str(args.json), "device_name": device_description(device),
                   "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
        args.json.write_text(json.dumps({"setting": setting, "points": [asdict(p) for p in points]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
