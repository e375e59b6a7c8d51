"""Time the quantized split-KV decode kernels (the folded one and the dequantizing one) under several launch
configurations (keys per inner step, warps, pipeline stages, CTAs per SM) on one GPU, next to the bf16 kernel at the
same shape, check each against the dequantize + SDPA reference in the query's dtype, and print a markdown table with
each compiled kernel's registers, spills and shared memory.

    python scripts/sweep_quant_decode.py --help
"""

from __future__ import annotations

import argparse

import torch
import triton

from duo_attn.kernels import triton_decode, triton_quant_decode
from duo_attn.kernels.quant_decode import reference_quant_decode_attention
from duo_attn.kernels.triton_decode import triton_decode_attention
from duo_attn.kernels.triton_quant_decode import LAUNCH, triton_quant_decode_attention
from duo_attn.kv_quant import KVQuantSpec, QuantizedKV, quantize_into

FOLDED = [
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 4}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "splits_per_sm": 8},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "splits_per_sm": 8},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "splits_per_sm": 2},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "packed": False},  # int4 nibbles converted arithmetically
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "packed": False},
]  # fmt: skip
DEQUANTIZING = [{"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}]


class CompiledRecorder:
    """Stands in for a `@triton.jit` kernel and keeps what its last launch compiled to, for its registers per
    thread, spilled registers and shared memory (what decides how many CTAs an SM holds)."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, None

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.compiled = launch(*args, **kwargs)
            return self.compiled

        return run

    def resources(self) -> str:
        c = self.compiled
        if c is None:
            return "?"
        shared = getattr(getattr(c, "metadata", None), "shared", None)
        kib = f"{shared / 1024:.0f}" if isinstance(shared, int) else "?"
        return f"{getattr(c, 'n_regs', '?')} / {getattr(c, 'n_spills', '?')} / {kib}"


Row = tuple[str, float, float, float, str]


def sweep(kind: str, tokens: int, kv_heads: int, groups: int, head_dim: int) -> list[Row]:
    """``(label, ms, GB/s, max |error| against the reference, "registers / spills / shared KiB")`` per kernel and
    launch, the bf16 kernel first; bytes are what each call reads."""
    spec, device = KVQuantSpec.from_name(kind, head_dim=head_dim), torch.device("cuda")
    query = torch.randn(1, kv_heads * groups, 1, head_dim, dtype=torch.bfloat16, device=device)
    length = torch.tensor([tokens], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    keys, values = (torch.randn(1, kv_heads, tokens, head_dim, dtype=torch.bfloat16, device=device) for _ in "kv")
    ms = triton.testing.do_bench(lambda: triton_decode_attention(query, keys, values, length, None, scale))
    rows = [("bf16 (triton_decode)", ms, 2 * keys.numel() * 2 / ms / 1e6, float("nan"), "")]
    del keys, values
    key, value = (QuantizedKV.empty(spec, 1, kv_heads, tokens, head_dim, device) for _ in range(2))
    step = 1 << 16
    for buffers in (key, value):
        for start in range(0, tokens, step):
            chunk = torch.randn(1, kv_heads, min(step, tokens - start), head_dim, dtype=torch.bfloat16, device=device)
            quantize_into(chunk, spec, buffers, start)
    reference = reference_quant_decode_attention(query.float(), key, value, spec, length, None, scale)
    nbytes = sum(t.numel() * t.element_size() for kv in (key, value) for t in kv.tensors())
    default, splits = dict(LAUNCH), (triton_decode.SPLITS_PER_SM, triton_decode.MAX_SPLITS)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    kernels = {name: getattr(triton_quant_decode, name) for name in ("_folded_split_kernel", "_quant_split_kernel")}
    try:
        for folded, configs in ((True, FOLDED), (False, DEQUANTIZING)):
            for config in configs:
                LAUNCH.clear()
                LAUNCH.update(default, folded=folded)
                LAUNCH.update({k: v for k, v in config.items() if k != "splits_per_sm"})
                triton_decode.SPLITS_PER_SM = config.get("splits_per_sm", splits[0])
                triton_decode.MAX_SPLITS = max(splits[1], -(-triton_decode.SPLITS_PER_SM * sms // kv_heads))
                name = "_folded_split_kernel" if folded else "_quant_split_kernel"
                recorder = CompiledRecorder(kernels[name])
                setattr(triton_quant_decode, name, recorder)
                call = lambda: triton_quant_decode_attention(query, key, value, spec, length, None, scale)  # noqa: E731
                error = (call().float() - reference).abs().max().item()
                setattr(triton_quant_decode, name, recorder.kernel)
                ms = triton.testing.do_bench(call)
                label = f"{kind} {'folded' if folded else 'dequantizing'} {config}"
                rows.append((label, ms, nbytes / ms / 1e6, error, recorder.resources()))
    finally:
        for name, kernel in kernels.items():
            setattr(triton_quant_decode, name, kernel)
        LAUNCH.clear()
        LAUNCH.update(default)
        triton_decode.SPLITS_PER_SM, triton_decode.MAX_SPLITS = splits
    return rows


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted), the bandwidth a kernel can hope for."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / triton.testing.do_bench(lambda: dst.copy_(src)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", default=["int4"], choices=["int8", "int4", "fp8"])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads per call (a layer's retrieval heads)")
    parser.add_argument("--groups", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the sweep times a CUDA kernel and needs a GPU")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, {args.tokens} tokens x {args.kv_heads} KV "
          f"heads x GQA {args.groups}, head_dim {args.head_dim}, bf16 queries; default {triton_quant_decode.LAUNCH}; "
          f"copy bandwidth {copy_bandwidth():.0f} GB/s\n")  # fmt: skip
    print("| kernel and launch | ms | GB/s read | max abs error vs reference | registers / spills / shared KiB |\n"
          "|---|---|---|---|---|")  # fmt: skip
    for kind in args.kind:
        for label, ms, rate, error, resources in sweep(kind, args.tokens, args.kv_heads, args.groups, args.head_dim):
            print(f"| {label} | {ms:.3f} | {rate:.0f} | {error:.1e} | {resources} |")


if __name__ == "__main__":
    main()
