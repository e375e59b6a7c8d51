"""Decode latency of ``model.generate`` itself, the path users call: transformers' static cache compiled by its own
generate (``hf-static``, transformers' fastest path) against the duo-patched model's generate (``duo-generate``).

Both start from a cache that already holds ``context`` random keys/values (the pre-fill is not what is timed) and
let generate run its decode loop; a logits processor timestamps every step on the GPU stream, so the per-token time
is generate's own, its host work and CUDA-graph replays included. generate compiles the step on its first decoding
iteration (transformers' default `CompileConfig`: inductor, reduce-overhead, static shapes); the steps before
``warmup`` are discarded and their longest is reported as the compile time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

from .compat import cache_kwargs
from .kv_cache import StaticDuoCache

GENERATE_METHODS = ("hf-static", "duo-generate")


class StepClock(LogitsProcessor):
    """Timestamps each decoding step of ``generate`` (a CUDA event on the current stream on a GPU, the host clock
    elsewhere) and leaves the scores unchanged."""

    def __init__(self, device: torch.device | str, on_step: Callable[[], None] | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []
        self.on_step = on_step  # e.g. a profiler's step()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()
        return scores

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive steps (the first mark follows the pre-fill forward)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def filled_cache(model, method: str, tokens: int, capacity: int, device: str):
    """A compileable cache for ``capacity`` tokens already holding ``tokens`` random keys/values, written through the
    cache's own update path: transformers' `StaticCache` (``hf-static``) or a `StaticDuoCache` (``duo-generate``)."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    if method == "hf-static":
        cache = StaticCache(config=config, max_cache_len=capacity)
    else:
        cache = StaticDuoCache.for_model(model, capacity)
        cache.begin_step(None, tokens, 1, torch.device(device))
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(1, config.num_key_value_heads, tokens, head_dim, dtype=model.dtype, device=device)
        cache.update(keys, torch.randn_like(keys), layer)
        del keys
    return cache


@contextmanager
def whole_step_compiled(model: torch.nn.Module) -> Iterator[None]:
    """generate compiles the whole forward; modules compiled one by one (``Module.compile``, e.g. by
    `generate.compile_decoder_modules`) run uncompiled inside it meanwhile, so one graph covers the step."""
    compiled = {m: m._compiled_call_impl for m in model.modules() if getattr(m, "_compiled_call_impl", None)}
    for module in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, impl in compiled.items():
            module._compiled_call_impl = impl


def _generate(model, cache, context: int, new_tokens: int, clock: StepClock) -> None:
    ids = torch.zeros(1, context + 1, dtype=torch.long, device=model.device)  # the cached tokens and one new one
    with whole_step_compiled(model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip


@torch.no_grad()
def generate_decode_ms(
    model, method: str, context: int, steps: int, warmup: int, device: str, capacity: int
) -> tuple[float, float, float, int]:
    """``(median ms per token, compile seconds, peak GiB, KV bytes)`` of generate's decode loop at ``context`` cached
    tokens; ``capacity`` sizes the cache (one size for every context keeps the duo step from being compiled again)."""
    from .eval.harness import kv_bytes

    cache = filled_cache(model, method, context, capacity, device)
    clock = StepClock(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _generate(model, cache, context, warmup + steps + 1, clock)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    deltas = clock.step_ms()
    if len(deltas) != warmup + steps:
        raise RuntimeError(f"generate ran {len(deltas) + 1} steps; expected {warmup + steps + 1}")
    return statistics.median(deltas[warmup:]), max(deltas[:warmup]) / 1e3, peak, kv_bytes(cache)


def kernel_summary(prof, steps: int) -> tuple[float | None, list[tuple[str, float]], dict[str, float]]:
    """From a profile of ``steps`` steps: GPU kernel ms per step (None: no kernels seen), the heaviest kernels (name,
    ms per step), and per-step counts of the host calls that launch work (kernels, CUDA graphs, synchronisations)."""
    kernels, host = [], {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if us and not event.key.startswith(("ProfilerStep", "## ")):  # annotations (step, compiled graph), not kernels
            kernels.append((event.key[:90], us / 1e3 / steps))
        if event.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaStreamSynchronize",
                         "cudaDeviceSynchronize", "cudaMemcpyAsync"):  # fmt: skip
            host[event.key] = event.count / steps
    kernels.sort(key=lambda item: -item[1])
    total = sum(ms for _, ms in kernels)
    return (total or None), kernels[:12] + [(f"[host calls per step] {k}", v) for k, v in host.items()], host


@torch.no_grad()
def generate_kernel_profile(
    model, method: str, context: int, steps: int, device: str, capacity: int
) -> tuple[float | None, list[tuple[str, float]]]:
    """Kernel ms per decoding step of generate and its heaviest kernels, profiled over ``steps`` steps after three
    warm-up steps (compiled, graphs recorded); the host launch counts are appended to the list."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cache = filled_cache(model, method, context, capacity, device)
    warm = 3
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warm, active=steps, repeat=1)) as prof:
        _generate(model, cache, context, warm + steps + 2, StepClock(device, on_step=prof.step))
        if cuda:
            torch.cuda.synchronize()
    total, top, _ = kernel_summary(prof, steps)
    return total, top


@torch.no_grad()
def generate_host_profile(model, method: str, context: int, steps: int, device: str, capacity: int) -> str:
    """Where generate's host time goes: cProfile over ``steps`` decoding steps after three warm-up steps, the
    functions with the most own time (a GPU step shorter than this is host-bound)."""
    import cProfile
    import io
    import pstats

    profiler, warm, calls = cProfile.Profile(), 3, [0]

    def on_step() -> None:
        calls[0] += 1
        if calls[0] == warm:
            profiler.enable()
        elif calls[0] == warm + steps:
            profiler.disable()

    cache = filled_cache(model, method, context, capacity, device)
    _generate(model, cache, context, warm + steps + 2, StepClock(device, on_step=on_step))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    total_ms = stats.total_tt * 1e3 / steps
    return f"{method} @ {context}: {total_ms:.2f} ms of profiled host time per step\n{text.getvalue()}"
