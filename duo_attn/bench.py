"""Efficiency benchmark: decode latency/memory, pre-fill latency/memory and KV bytes, duo vs full attention.

Models are built from configs with random bf16 weights (speed and memory do not depend on the weights). The methods
run side by side in one process: ``hf`` (transformers' eager SDPA forward on its default DynamicCache),
``hf-static`` (transformers' StaticCache under its own generate, which compiles the step: its fastest path),
``duo-full`` (this library, every head a retrieval head) and ``duo`` (this library with a pattern), both stepped by
`generate.StaticDecoder` (a CUDA-graph replay per token), and ``duo-generate`` (the duo-patched model's own
``model.generate``, compiled by transformers on a `StaticDuoCache`). Pre-fill runs hf, duo-full and duo. Every point
also prints the ideal ratio (decode: bytes moved, weights + KV; pre-fill: FLOPs) and the achieved fraction of it.
Out-of-memory points are reported as OOM.

    python -m duo_attn.bench --help
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig

from .compat import cache_kwargs
from .eval.harness import kv_bytes, new_cache
from .eval.report import kv_quant_arg
from .generate import StaticDecoder, compile_decoder_modules
from .kv_cache import DuoCache, StaticDuoCache
from .patch import disable_duo_attention, enable_duo_attention_eval
from .bench_generate import (
    GENERATE_METHODS,
    generate_decode_ms,
    generate_host_profile,
    generate_kernel_profile,
    kernel_summary,
)
from .bench_report import (
    DECODE_METHODS,
    PREFILL_METHODS,
    Point,
    full_kv_bytes,
    markdown_table,
    plot,
    save_points,
    summarise_decode,
    summarise_prefill,
)
from .patterns import load_attn_pattern, sparsify_attention_heads

SHAPES = {
    "llama2-7b": lambda: LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=1 << 20,
    ),
    "llama3-8b": lambda: LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1 << 20,
    ),
    "mistral-7b": lambda: MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, sliding_window=None, max_position_embeddings=1 << 20,
    ),
}
REFERENCE_PATTERNS = {
    "llama2-7b": "Llama-2-7B-32K-Instruct",
    "llama3-8b": "Llama-3-8B-Instruct-Gradient-1048k",
    "mistral-7b": "Mistral-7B-Instruct-v0.2",
}
PATTERNS_ENV = "DUO_ATTN_REFERENCE_PATTERNS"


def build_model(shape: str, device: str) -> torch.nn.Module:
    config = SHAPES[shape]()
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def head_mask(shape: str, sparsity: float, patterns_dir: Path | None, config) -> tuple[np.ndarray, str]:
    """Retrieval-head mask: a published pattern of the same shape when available, else random at that sparsity."""
    if patterns_dir is not None and (patterns_dir / REFERENCE_PATTERNS[shape]).is_dir():
        gates, _, _ = load_attn_pattern(patterns_dir / REFERENCE_PATTERNS[shape])
        return sparsify_attention_heads(gates, sparsity=sparsity)[0], REFERENCE_PATTERNS[shape]
    gates = np.random.default_rng(0).random((config.num_hidden_layers, config.num_key_value_heads))
    return sparsify_attention_heads(gates, sparsity=sparsity)[0], "random"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every weight except the input embedding table (only one row is read)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def copy_bandwidth(device: str) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) * 2 / statistics.median(times)


def make_cache(model, method: str, tokens: int, device: str, capacity: int | None = None):
    """A cache holding ``tokens`` random keys/values, filled through the cache's own update path; with ``capacity``
    a duo cache is a `StaticDuoCache` of that many tokens."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    if method == "hf":
        cache = DynamicCache(config=config)
    else:
        cache = DuoCache.for_model(model) if capacity is None else StaticDuoCache.for_model(model, capacity)
    if isinstance(cache, DuoCache):
        cache.begin_step(None, tokens, 1, torch.device(device))
    for layer in range(config.num_hidden_layers):
        shape = (1, config.num_key_value_heads, tokens, head_dim)
        keys = torch.randn(shape, dtype=torch.bfloat16, device=device)
        cache.update(keys, torch.randn_like(keys), layer)
        del keys
    return cache


def _event_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def kernel_ms_per_call(fn, calls: int) -> tuple[float | None, list[tuple[str, float]]]:
    """Sum of GPU kernel times per call, from the profiler (the step's device time without launch gaps), and the
    heaviest kernels (name, ms per call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total, top, _ = kernel_summary(prof, calls)
    return total, top


def set_method(model, method: str, mask: np.ndarray, sink: int, recent: int, kv_quant: str | None = None) -> None:
    """Switch the model to ``method``; the duo methods store their retrieval heads as ``kv_quant``."""
    if getattr(model, "duo_attention", None) is not None:
        disable_duo_attention(model)
    if method == "duo-full":
        enable_duo_attention_eval(model, np.ones_like(mask), sink_size=sink, recent_size=recent, kv_quant=kv_quant)
    elif method in ("duo", "duo-generate"):
        enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent, kv_quant=kv_quant)


@torch.no_grad()
def bench_decode(model, method: str, context: int, args: argparse.Namespace) -> Point:
    """Per-token latency at ``context`` cached tokens. ``hf`` runs transformers' eager forward on its DynamicCache;
    duo-full and duo decode on a static cache, each step a CUDA-graph replay (or an eager forward with
    ``--eager-decode``); the generate methods are timed inside ``model.generate`` (bench_generate)."""
    torch.cuda.empty_cache()
    profiled, margin = 10, args.warmup + args.decode_steps + 11
    try:
        if method in GENERATE_METHODS:
            # duo-generate: one capacity for every context (its step is compiled once); hf-static: sized per
            # context, as its generate sizes it (its attention reads the whole buffer)
            capacity = context + margin if method == "hf-static" else max(args.decode_contexts) + margin
            ms, compile_s, peak, kv = generate_decode_ms(
                model, method, context, args.decode_steps, args.warmup, args.device, capacity
            )
            _release()
            kernels, top = generate_kernel_profile(model, method, context, profiled, args.device, capacity)
            if args.host_profile:
                _release()
                with (args.out / "host-profile.txt").open("a") as log:
                    log.write(generate_host_profile(model, method, context, profiled, args.device, capacity))
            point = Point("decode", method, context, None, ms, peak, kv, kernels, top, compile_s=compile_s)
        else:
            point = _bench_step(model, method, context, args, profiled, None if method == "hf" else context + margin)
    except torch.cuda.OutOfMemoryError as err:
        print(f"OOM: decode {method} {context}: {str(err).splitlines()[0]}")
        point = Point("decode", method, context, None, None, None, None)
    _release()
    return point


def _bench_step(model, method: str, context: int, args: argparse.Namespace, profiled: int, capacity: int | None):
    cache = make_cache(model, method, context, args.device, capacity)
    token = torch.zeros(1, 1, dtype=torch.long, device=args.device)
    if isinstance(cache, DuoCache):
        decoder = StaticDecoder(model, cache, cuda_graph=not args.eager_decode)
        step = lambda: decoder(token)  # noqa: E731
    else:
        step = lambda: model(token, **cache_kwargs(model, cache), use_cache=True)  # noqa: E731
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = [_event_ms(step) for _ in range(args.decode_steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30
    kernels, top = kernel_ms_per_call(step, profiled)
    return Point("decode", method, context, None, statistics.median(times), peak, kv_bytes(cache), kernels, top)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def bench_prefill(model, method: str, context: int, chunk: int, device: str) -> Point:
    torch.cuda.empty_cache()
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)

    def run(tokens: int = context):
        cache = new_cache(model)  # the model is switched to the method: a DuoCache, or DynamicCache for hf
        for start in range(0, tokens, chunk):
            model(ids[:, start : min(start + chunk, tokens)], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        return cache

    try:
        # warm-up on the run's chunk shapes (first chunk, a later one, the remainder): kernel selection and
        # FlexAttention compilation
        run(min(context, 2 * chunk) + (context % chunk if context > 2 * chunk else 0))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        box = {}
        ms = _event_ms(lambda: box.setdefault("cache", run()))
        point = Point("prefill", method, context, chunk, ms, torch.cuda.max_memory_allocated() / 2**30,
                      kv_bytes(box["cache"]))
    except torch.cuda.OutOfMemoryError as err:
        print(f"OOM: prefill {method} {context}/{chunk}: {str(err).splitlines()[0]}")
        point = Point("prefill", method, context, chunk, None, None, None)
    _release()
    return point


def default_patterns_dir() -> Path | None:
    """Where the published reference patterns are by default: ``$DUO_ATTN_REFERENCE_PATTERNS``, else
    ``shared/reference_patterns`` beside the repository's root directory when it exists."""
    if os.environ.get(PATTERNS_ENV):
        return Path(os.environ[PATTERNS_ENV]).expanduser()
    beside = Path(__file__).resolve().parents[2] / "shared" / "reference_patterns"
    return beside if beside.is_dir() else None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duo-attn bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--sparsity", type=float, default=0.75, help="fraction of KV heads made streaming")
    parser.add_argument("--patterns-dir", type=Path, default=default_patterns_dir(),
                        help=f"directory of published patterns ({', '.join(sorted(REFERENCE_PATTERNS.values()))}) "
                        f"for realistic per-layer head counts; default ${PATTERNS_ENV}, else "
                        "shared/reference_patterns beside the repository (a shape without its pattern there gets "
                        "random heads)")  # fmt: skip
    parser.add_argument("--random-heads", action="store_true", help="random heads at --sparsity, no patterns needed")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[16384, 32768, 65536, 100000])
    parser.add_argument("--decode-methods", nargs="*", choices=DECODE_METHODS, default=list(DECODE_METHODS),
                        help="decode methods to run (default: all)")
    parser.add_argument("--host-profile", action="store_true",
                        help="also cProfile the host side of the generate methods' steps (appended to host-profile.txt)")
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eager-decode", action="store_true",
                        help="decode duo methods with eager forwards instead of CUDA-graph replays")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder layers' norms and MLPs (generate.compile_decoder_modules)")
    parser.add_argument("--prefill-context", type=int, default=65536)
    parser.add_argument("--prefill-chunks", type=int, nargs="*", default=[8192, 16384, 32768])
    parser.add_argument("--kv-context", type=int, default=32768, help="context of the KV-bytes-vs-retrieval table")
    parser.add_argument("--kv-quant", type=kv_quant_arg, metavar="KIND",
                        help="duo methods store retrieval heads as int8, int4 or fp8 (default: bf16); KV bytes and "
                        "ideal ratios count codes, scales and zeros (duo_attn.bench_kv_quant: capacity and speed)")
    parser.add_argument("--out", type=Path, default=Path("docs/efficiency"))
    parser.add_argument("--name", help="base name of the output files (default: <shape>-r<retrieval fraction>)")
    parser.add_argument("--device", default="cuda")
    return parser


@dataclass
class _Run:
    """One benchmark invocation: the model, its head mask, and what has been measured and written so far."""

    args: argparse.Namespace
    model: torch.nn.Module
    mask: np.ndarray
    name: str
    meta: dict
    wbytes: int
    bandwidth: float
    points: list = field(default_factory=list)

    def measure(self, methods, values: list, measure_one: Callable[[str, int], Point]) -> list[Point]:
        """``measure_one(method, value)`` for every method (the model switched to it) and value; the results file
        is rewritten after every point, so a run cut short keeps what it measured."""
        measured = []
        for method in methods:
            set_method(self.model, method, self.mask, self.args.sink, self.args.recent, self.args.kv_quant)
            for value in values:
                point = measure_one(method, value)
                print(point, flush=True)
                measured.append(point)
                save_points(self.args.out / f"{self.name}.json", self.meta, self.points + measured)
        self.points += measured
        return measured


def _decode_report(run: _Run) -> list[str]:
    args, name = run.args, run.name
    decode = run.measure(args.decode_methods, args.decode_contexts, lambda method, context: bench_decode(
        run.model, method, context, args
    ))  # fmt: skip
    rows = summarise_decode(decode, run.model.config, run.wbytes, run.bandwidth)
    profile = []
    for p in decode:
        profile.append(f"{p.method} @ {p.context}: {p.kernel_ms} ms of kernels per token; heaviest:")
        profile += [f"  {ms:8.3f} ms  {kernel}" for kernel, ms in p.top_kernels or []]
    (args.out / f"{name}-kernels.txt").write_text("\n".join(profile) + "\n")
    plot(rows, "context", [f"{m} ms" for m in DECODE_METHODS], "ms / token", f"decode, {name}",
         args.out / f"decode-{name}.png")  # fmt: skip
    return ["## Decode (median ms per token)", "", markdown_table(rows, list(rows[0])), ""]


def _prefill_report(run: _Run) -> list[str]:
    args, name = run.args, run.name
    prefill = run.measure(PREFILL_METHODS, args.prefill_chunks, lambda method, chunk: bench_prefill(
        run.model, method, args.prefill_context, chunk, args.device
    ))  # fmt: skip
    window = args.sink + args.recent
    rows = summarise_prefill(prefill, run.model.config, run.meta["retrieval_fraction"], window, run.wbytes)
    plot(rows, "chunk", ["hf s", "duo-full s", "duo s"], "seconds", f"pre-fill {args.prefill_context}, {name}",
         args.out / f"prefill-{name}.png")  # fmt: skip
    return [f"## Pre-fill of {args.prefill_context} tokens (seconds)", "", markdown_table(rows, list(rows[0])), ""]


def _kv_report(run: _Run) -> list[str]:
    args = run.args
    full = full_kv_bytes(run.model.config, args.kv_context)
    rows = []
    for sparsity in (0.0, 0.25, 0.5, 0.75, 0.9):
        ranking = 0.5 * run.mask + 0.5 * np.random.default_rng(1).random(run.mask.shape)  # the pattern's heads first
        ratio_mask = sparsify_attention_heads(ranking, sparsity=sparsity)[0]
        set_method(run.model, "duo", ratio_mask, args.sink, args.recent, args.kv_quant)
        cache = make_cache(run.model, "duo", args.kv_context, args.device)
        measured = cache.nbytes()
        del cache
        torch.cuda.empty_cache()
        rows.append({"retrieval fraction": float(ratio_mask.mean()), "KV GiB": measured / 2**30,
                     "full KV GiB": full / 2**30, "ratio": measured / full})  # fmt: skip
    return [f"## KV-cache bytes at {args.kv_context} tokens", "", markdown_table(rows, list(rows[0])), ""]


def main(argv: list[str] | None = None) -> None:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the efficiency benchmark times CUDA kernels and needs a GPU")
    if args.random_heads:
        args.patterns_dir = None
    elif args.patterns_dir is None or not args.patterns_dir.is_dir():
        where = "none found" if args.patterns_dir is None else f"{args.patterns_dir} is not a directory"
        parser.error(f"no reference patterns ({where}): pass --patterns-dir DIR or set ${PATTERNS_ENV} to the "
                     "directory of published patterns, or --random-heads")  # fmt: skip
    # Every method runs with the same SDPA kernels; cuDNN's is left out (see kernels.sdpa).
    torch.backends.cuda.enable_cudnn_sdp(False)

    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.shape, args.device)
    if args.compile:
        compile_decoder_modules(model)
    mask, mask_source = head_mask(args.shape, args.sparsity, args.patterns_dir, model.config)
    retrieval = float(mask.mean())
    wbytes = weight_bytes(model)
    bandwidth = copy_bandwidth(args.device)
    meta = {
        "shape": args.shape, "retrieval_fraction": retrieval, "pattern": mask_source, "sink": args.sink,
        "recent": args.recent, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "copy_bandwidth_GBps": bandwidth / 1e9, "weight_GB": wbytes / 1e9, "date": time.strftime("%Y-%m-%d"),
        "decode": "eager" if args.eager_decode else "cuda-graph", "compiled_modules": args.compile,
        "kv_quant": args.kv_quant,
    }  # fmt: skip
    print(json.dumps(meta))
    default_name = f"{args.shape}-r{retrieval:.2f}" + (f"-{args.kv_quant}" if args.kv_quant else "")
    run = _Run(args, model, mask, args.name or default_name, meta, wbytes, bandwidth)
    report = [
        f"# {args.shape}, {retrieval:.0%} retrieval heads ({mask_source}), sink {args.sink} + recent {args.recent}"
        + (f", duo's retrieval KV as {args.kv_quant}" if args.kv_quant else ""),
        "",
        f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}; "
        f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write).",
        "",
    ]
    for wanted, section in ((args.decode_contexts, _decode_report), (args.prefill_chunks, _prefill_report),
                            (args.kv_context, _kv_report)):  # fmt: skip
        if wanted:
            report += section(run)
    (args.out / f"{run.name}.md").write_text("\n".join(report))
    save_points(args.out / f"{run.name}.json", meta, run.points)
    print("\n".join(report))

if __name__ == "__main__":
    main()
