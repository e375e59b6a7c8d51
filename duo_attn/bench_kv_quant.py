"""Capacity and speed of the quantized KV cache on one GPU (issue #12's targets), in one budgeted command.

Llama-3-8B shape by default (``bench.SHAPES``, random bf16 weights), 50% retrieval heads, int4 retrieval KV:

- ``capacity``: decode ms/token and peak memory at 1M, 2M and 3.3M tokens with the process capped to 80 GiB
  (``torch.cuda.set_per_process_memory_fraction``), at 6M uncapped, and the largest context that fits each way
  (from the bytes per token measured so far, then bisection on out-of-memory);
- ``speed``: int4 against bf16 duo decode at contexts where bf16 fits: the speedup against the ideal byte ratio
  (weights + KV bytes, scales and zeros included), and bytes read per step over the measured copy bandwidth;
- ``prefill``: one real chunked pre-fill (1M tokens) into an int4 `StaticDuoCache`, its time and peak memory, then
  decode steps over what it stored.

Capacity and speed caches are filled with random keys and values through the cache's own write path (chunks planned
by ``begin_step`` and written by ``Cache.update``, quantized as written, as in a pre-fill), not by forward passes:
what a decode step reads, and how fast, does not depend on the values, and pre-filling 6M tokens would take hours.
Decode steps are CUDA-graph replays of `StaticDecoder` (the split-KV Triton kernel reads the codes in place).

``--max-seconds`` bounds the run: a point whose estimated cost no longer fits is skipped, the pre-fill stops at the
deadline and says how far it got, and every point is written to ``--out`` as soon as it is measured (a run cut
short, or interrupted, still prints and keeps its tables). On a CPU (``--shape tiny --device cpu``) the same code runs
eagerly at tiny sizes, without the cap or the search, as a smoke test.

    python -m duo_attn.bench_kv_quant --help
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import PreTrainedConfig

from . import bench
from .bench_kv_quant_report import GIB, Point, markdown_report, save
from .compat import cache_kwargs
from .eval.report import kv_quant_arg
from .generate import StaticDecoder, compile_decoder_modules
from .kv_cache import DuoCache, StaticDuoCache
from .models import tiny_config
from .patch import enable_duo_attention_eval

SECTIONS = ("capacity", "speed", "prefill")
FILL_BLOCK = 1 << 15  # tokens per planned chunk when filling a cache: the quantizer's fp32 temporaries then stay
# below ~1 GiB, which a cache filled to within a GiB of the cap can still take
CONTEXT_GRANULE = 1 << 14  # contexts the search tries are multiples of this
PROFILED_STEPS = 5  # decode steps under the profiler, for the kernel time per step
DECODE_SECONDS = 10.0  # what a decode point costs beyond its fill (graph capture, steps, profile), to budget it
_UNPATCHED = object()


def build_model(shape: str, device: str) -> torch.nn.Module:
    """Random bf16 weights of a `bench.SHAPES` shape, or ``tiny`` (tiny_config's 2-layer Llama) for CPU smoke runs."""
    if shape != "tiny":
        return bench.build_model(shape, device)
    config = tiny_config("llama", vocab_size=512)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def fill_random(
    cache: DuoCache, config: PreTrainedConfig, tokens: int, device: torch.device, block: int = FILL_BLOCK
) -> None:
    """Write ``tokens`` random keys and values into every layer of an empty ``cache`` through its own write path:
    chunks of ``block`` tokens planned by `DuoCache.begin_step` and written by ``Cache.update`` (a quantized cache
    quantizes each chunk as it is written), without a forward pass."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for start in range(0, tokens, block):
        n = min(block, tokens - start)
        cache.begin_step(None, n, 1, device)
        for layer in range(config.num_hidden_layers):
            keys = torch.randn(1, config.num_key_value_heads, n, head_dim, dtype=torch.bfloat16, device=device)
            cache.update(keys, torch.randn_like(keys), layer)


def next_context(lo: int, hi: int | None, predicted: int | None, granule: int = CONTEXT_GRANULE) -> int | None:
    """The next context the search for the largest that fits tries: ``predicted`` while it lies between the
    largest that fitted (``lo``) and the smallest that did not (``hi``; None while none failed), else 2% past ``lo``
    until something fails, then bisection. None once ``lo`` and ``hi`` are a granule (or 0.5%) apart."""
    if hi is not None and hi - lo <= max(granule, lo // 200):
        return None
    if predicted is not None and lo < predicted and (hi is None or predicted < hi):
        guess = predicted
    elif hi is None:
        guess = int(lo * 1.02) if lo else None
    else:
        guess = (lo + hi) // 2
    if guess is None:
        return None
    guess = max(guess // granule, lo // granule + 1) * granule  # a multiple of the granule, above lo
    return None if hi is not None and guess >= hi else guess


class Budget:
    """The run's deadline, counted from its start (model building included)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free what the last point held, so the next one starts from the weights alone, and restart the peak counters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call's time: CUDA events on a GPU (device time, the host's launch ahead of it excluded), else wall time."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def set_memory_cap(device: torch.device, gib: float | None) -> None:
    """Cap what this process's allocator may hold on ``device`` (None: the whole device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()  # the call needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total), index)


@dataclass
class Run:
    """One invocation: the model, its head mask, the budget and what has been measured and written so far."""

    args: argparse.Namespace
    model: torch.nn.Module
    mask: np.ndarray
    meta: dict
    budget: Budget
    points: list[Point] = field(default_factory=list)
    fill_rate: dict = field(default_factory=dict)  # kv_quant -> tokens per second fill_random reached
    patched_for: object = _UNPATCHED  # the kv_quant the model is patched with

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.device)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def patch(self, kv_quant: str | None) -> None:
        if self.patched_for is _UNPATCHED or self.patched_for != kv_quant:
            args = self.args
            enable_duo_attention_eval(self.model, self.mask, sink_size=args.sink, recent_size=args.recent,
                                      kv_quant=kv_quant)  # fmt: skip
            self.patched_for = kv_quant

    def record(self, point: Point) -> Point:
        self.points.append(point)
        shown = {k: v for k, v in vars(point).items() if v not in (None, "")}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()), flush=True)
        self.meta["seconds"] = self.budget.elapsed()
        save(self.args.out, self.args.name, self.meta, self.points)
        return point

    def affordable(self, kv_quant: str | None, context: int) -> bool:
        """Whether a decode point still fits the budget, from the fill rate measured so far."""
        rate = self.fill_rate.get(kv_quant)
        return self.budget.left() > (context / rate if rate else 0.0) + DECODE_SECONDS


def measure_decode(run: Run, section: str, kv_quant: str | None, context: int, cap_gib: float | None) -> Point:
    """Decode at ``context`` tokens: a `StaticDuoCache` filled by `fill_random`, then CUDA-graph steps (eager on a
    CPU). Out of memory, or a cap the allocator did not hold, is the point's status, not an error."""
    point = Point(section, kv_quant, context, cap_gib, "ok")
    if not run.affordable(kv_quant, context):
        point.status = "skipped (budget)"
        return run.record(point)
    run.patch(kv_quant)
    _release(run.device)
    args, device = run.args, run.device
    cache = decoder = None
    try:
        cache = StaticDuoCache.for_model(run.model, context + args.warmup + args.decode_steps + PROFILED_STEPS + 1)
        started = time.perf_counter()
        fill_random(cache, run.model.config, context, device)
        _sync(device)
        point.fill_s = time.perf_counter() - started
        run.fill_rate[kv_quant] = context / point.fill_s
        point.kv_bytes = cache.nbytes()
        decoder = StaticDecoder(run.model, cache, cuda_graph=run.on_cuda)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        for _ in range(args.warmup):  # the first call runs eagerly, the second captures the graph
            decoder(token)
        _sync(device)
        point.ms = statistics.median(_time_ms(lambda: decoder(token), device) for _ in range(args.decode_steps))
        if run.on_cuda:
            point.kernel_ms, _ = bench.kernel_ms_per_call(lambda: decoder(token), PROFILED_STEPS)
            point.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
            point.reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
            if cap_gib is not None and point.reserved_gib > cap_gib:
                point.status = "over cap"
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
        _out_of_memory(err, point)
    cache = decoder = None  # noqa: F841 (dropped before the release, so their memory goes back)
    _release(device)
    return run.record(point)


def _out_of_memory(err: RuntimeError, point: Point) -> None:
    """Record an out-of-memory error as the point's status (the allocator's, or a CUDA call's during graph capture);
    any other error is raised."""
    if not isinstance(err, torch.cuda.OutOfMemoryError) and "out of memory" not in str(err).lower():
        raise err
    point.status, point.note = "OOM", str(err).splitlines()[0][:200]


def _predicted_capacity(points: list[Point], limit_bytes: int) -> int | None:
    """Tokens that would fill ``limit_bytes``, from the largest point that fitted: its bytes per cached token, and
    what it held besides the cache (weights, workspace, the allocator's slack)."""
    fitted = [p for p in points if p.fits and p.kv_bytes and p.reserved_gib]
    if not fitted:
        return None
    best = max(fitted, key=lambda p: p.context)
    per_token = best.kv_bytes / best.context
    besides = best.reserved_gib * GIB - best.kv_bytes
    return int((limit_bytes - besides) / per_token)


def find_largest(run: Run, cap_gib: float | None, points: list[Point]) -> None:
    """Search, within `--search-steps` tries and the budget, the largest context that decodes under the cap."""
    device = run.device
    limit = cap_gib * GIB if cap_gib is not None else torch.cuda.mem_get_info(device)[1]
    lo = max((p.context for p in points if p.fits), default=0)
    hi = min((p.context for p in points if p.status in ("OOM", "over cap") and p.context > lo), default=None)
    for _ in range(run.args.search_steps):
        context = next_context(lo, hi, _predicted_capacity(points, limit))
        if context is None:
            return
        point = measure_decode(run, "largest", run.args.kv_quant, context, cap_gib)
        if point.status == "skipped (budget)":
            return
        points.append(point)
        if point.fits:
            lo = context
        else:
            hi = context


def capacity_section(run: Run) -> None:
    args = run.args
    for cap, contexts in ((args.cap_gib, args.capped_contexts), (None, args.uncapped_contexts)):
        if cap is not None and not run.on_cuda:
            print(f"capped contexts {contexts} skipped: the memory cap needs a GPU")
            continue
        if run.on_cuda:
            set_memory_cap(run.device, cap)
        points = [measure_decode(run, "capacity", args.kv_quant, context, cap) for context in contexts]
        if args.search and run.on_cuda:
            find_largest(run, cap, points)
    if run.on_cuda:
        set_memory_cap(run.device, None)


def speed_section(run: Run) -> None:
    for context in run.args.speed_contexts:
        for kv_quant in (None, run.args.kv_quant):  # bf16 duo, then quantized duo, at the same context
            measure_decode(run, "speed", kv_quant, context, None)


@torch.no_grad()
def _prefill_chunks(run: Run, cache: StaticDuoCache, ids: torch.Tensor, deadline: bool) -> int:
    """Feed ``ids`` chunk by chunk (only the last position's logits); returns the tokens fed. With ``deadline``, the
    next chunk is not started when the budget left is shorter than the last chunk took."""
    model, chunk, device = run.model, run.args.prefill_chunk, run.device
    done, last_seconds = 0, 0.0
    for start in range(0, ids.shape[1], chunk):
        if deadline and run.budget.left() < last_seconds:
            break
        end = min(start + chunk, ids.shape[1])
        began = time.perf_counter()
        positions = torch.arange(start, end, device=device)[None]
        model(ids[:, start:end], position_ids=positions, **cache_kwargs(model, cache), use_cache=True,
              logits_to_keep=1)  # fmt: skip
        _sync(device)
        done, last_seconds = end, time.perf_counter() - began
    return done


def prefill_section(run: Run) -> None:
    """One real chunked pre-fill into a quantized `StaticDuoCache`, after a two-chunk warm-up into a throwaway cache
    (kernel selection, FlexAttention's compilation); then decode steps over the tokens it stored."""
    args, device, model = run.args, run.device, run.model
    context = args.prefill_context
    point = Point("prefill", args.kv_quant, context, None, "ok", note=f"chunks of {args.prefill_chunk} tokens")
    run.patch(args.kv_quant)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    cache = decoder = None
    try:
        warm_tokens = min(context, 2 * args.prefill_chunk)
        _prefill_chunks(run, StaticDuoCache.for_model(model, warm_tokens), ids[:, :warm_tokens], deadline=False)
        _release(device)
        cache = StaticDuoCache.for_model(model, context + args.warmup + args.decode_steps + 1)
        started = time.perf_counter()
        point.prefill_tokens = _prefill_chunks(run, cache, ids, deadline=True)
        point.prefill_s = time.perf_counter() - started
        if point.prefill_tokens < context:
            point.status = "cut short"
            point.note += f"; the budget ended after {point.prefill_tokens} tokens"
        point.kv_bytes = cache.nbytes()
        if run.on_cuda:
            point.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
            point.reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
        decoder = StaticDecoder(model, cache, cuda_graph=run.on_cuda)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        for _ in range(args.warmup):
            decoder(token)
        _sync(device)
        point.ms = statistics.median(_time_ms(lambda: decoder(token), device) for _ in range(args.decode_steps))
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
        _out_of_memory(err, point)
    cache = decoder = None  # noqa: F841
    _release(device)
    run.record(point)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duo-attn bench-kv-quant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--shape", choices=[*sorted(bench.SHAPES), "tiny"], default="llama3-8b")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of KV heads made streaming")
    parser.add_argument("--kv-quant", type=kv_quant_arg, default="int4", help="retrieval KV kind (int8, int4, fp8)")
    parser.add_argument("--patterns-dir", type=Path, default=bench.default_patterns_dir(),
                        help="published patterns for realistic per-layer head counts (as bench.py); random heads "
                        "when the shape's pattern is not there")  # fmt: skip
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--cap-gib", type=float, default=80.0, help="the capped runs' memory limit")
    parser.add_argument("--capped-contexts", type=int, nargs="*", default=[1_000_000, 2_000_000, 3_300_000])
    parser.add_argument("--uncapped-contexts", type=int, nargs="*", default=[6_000_000])
    parser.add_argument("--no-search", dest="search", action="store_false",
                        help="do not search the largest context that fits (GPU only)")
    parser.add_argument("--search-steps", type=int, default=4, help="tries of the search, per cap")
    parser.add_argument("--speed-contexts", type=int, nargs="*", default=[250_000, 1_000_000, 1_500_000],
                        help="contexts where bf16 duo also fits")  # fmt: skip
    parser.add_argument("--prefill-context", type=int, default=1_000_000)
    parser.add_argument("--prefill-chunk", type=int, default=32768)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="decode steps before timing (>= 2: eager, capture)")
    parser.add_argument("--max-seconds", type=float, default=470.0, help="the run's budget, model building included")
    parser.add_argument("--out", type=Path, default=Path("docs/kv_quant_gpu"))
    parser.add_argument("--name", help="base name of the output files (default: shape, retrieval, kind, sections)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder layers' norms and MLPs (as bench.py --compile; costs "
                        "compile time out of the budget)")  # fmt: skip
    parser.add_argument("--device", default="cuda")
    return parser


def main(argv: list[str] | None = None) -> list[Point]:
    """Run the sections asked for within the budget; print and write (``--out``) what was measured."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU here: pass --device cpu (with --shape tiny and small contexts) for a smoke run")
    if args.kv_quant is None:
        parser.error("--kv-quant none measures nothing new: the speed section compares it with bf16 already")
    if args.warmup < 2 and device.type == "cuda":
        parser.error("--warmup must be >= 2 on a GPU: the first step runs eagerly, the second captures the graph")
    # before the first CUDA allocation: long runs allocate and free ~1 GiB buffers, which fragment without it
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    budget = Budget(args.max_seconds)
    torch.manual_seed(0)
    model = build_model(args.shape, args.device)
    if args.compile:
        compile_decoder_modules(model)
    torch.backends.cuda.enable_cudnn_sdp(False)  # as bench.py: cuDNN's SDPA re-plans for every new key length
    patterns = args.patterns_dir if args.shape in bench.REFERENCE_PATTERNS else None
    mask, source = bench.head_mask(args.shape, args.sparsity, patterns, model.config)
    run = Run(args, model, mask, {}, budget)
    run.patch(args.kv_quant)
    meta = run.meta
    meta.update({
        "shape": args.shape, "retrieval_fraction": float(mask.mean()), "pattern": source,
        "kv_quant": model.duo_attention.kv_quant.name, "sink": args.sink, "recent": args.recent,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": _triton_version(),
        "python": platform.python_version(), "weight_bytes": bench.weight_bytes(model),
        "copy_bandwidth_Bps": bench.copy_bandwidth(args.device) if device.type == "cuda" else None,
        "decode": "cuda-graph" if device.type == "cuda" else "eager", "decode_steps": args.decode_steps,
        "compiled_modules": args.compile,
        "max_seconds": args.max_seconds, "sections": args.sections, "date": time.strftime("%Y-%m-%d"),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "command": sys.argv[1:] if argv is None else list(argv),
    })  # fmt: skip
    args.name = args.name or f"{args.shape}-r{mask.mean():.2f}-{args.kv_quant}-{'-'.join(args.sections)}"
    sections = {"capacity": capacity_section, "speed": speed_section, "prefill": prefill_section}
    try:
        for section in args.sections:
            if budget.left() <= 0:
                print(f"section {section} skipped: the {args.max_seconds:g} s budget is spent")
                continue
            sections[section](run)
    finally:
        meta["seconds"] = budget.elapsed()
        save(args.out, args.name, meta, run.points)
        print(markdown_report(meta, run.points))
        print(f"wrote {args.out / args.name}.md and .json")
    return run.points


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
