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
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

from .compat import cache_kwargs
from .kv_cache import StaticDuoCache

GENERATE_METHODS = ("hf-static", "duo-generate")


class StepClock(LogitsProcessor):
    """Timestamps each decoding step of ``generate`` (a CUDA event on the current stream on a GPU, the host clock
    elsewhere) and leaves the scores unchanged."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
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


@torch.no_grad()
def generate_decode_ms(
    model, method: str, context: int, steps: int, warmup: int, device: str, capacity: int
) -> tuple[float, float, float, int]:
    """``(median ms per token, compile seconds, peak GiB, KV bytes)`` of generate's decode loop at ``context`` cached
    tokens; ``capacity`` sizes the cache (one size for every context keeps the duo step from being compiled again)."""
    from .eval.harness import kv_bytes

    cache = filled_cache(model, method, context, capacity, device)
    ids = torch.zeros(1, context + 1, dtype=torch.long, device=device)  # the cached tokens and one new one
    clock = StepClock(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with whole_step_compiled(model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), do_sample=False,
            max_new_tokens=warmup + steps + 1, min_new_tokens=warmup + steps + 1, pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    deltas = clock.step_ms()
    if len(deltas) != warmup + steps:
        raise RuntimeError(f"generate ran {len(deltas) + 1} steps; expected {warmup + steps + 1}")
    return statistics.median(deltas[warmup:]), max(deltas[:warmup]) / 1e3, peak, kv_bytes(cache)
