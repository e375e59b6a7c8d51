"""Time the quantized split-KV decode kernel under other launch configurations (keys per inner step, warps,
pipeline stages) on one GPU, next to the bf16 kernel at the same shape, and print a markdown table.

    python scripts/sweep_quant_decode.py --help
"""

from __future__ import annotations

import argparse

import torch
import triton

from duo_attn.kernels import triton_quant_decode
from duo_attn.kernels.triton_decode import triton_decode_attention
from duo_attn.kernels.triton_quant_decode import LAUNCH, triton_quant_decode_attention
from duo_attn.kv_quant import KVQuantSpec, QuantizedKV, quantize_into

CONFIGS = [
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2}, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 2, "num_stages": 2}, {"BLOCK_N": 32, "num_warps": 2, "num_stages": 4},
]  # fmt: skip


def sweep(kind: str, tokens: int, kv_heads: int, groups: int, head_dim: int) -> list[tuple[str, float, float]]:
    """``(label, ms, GB/s)`` per launch configuration, the bf16 kernel first; bytes are what each call reads."""
    spec, device = KVQuantSpec.from_name(kind, head_dim=head_dim), torch.device("cuda")
    query = torch.randn(1, kv_heads * groups, 1, head_dim, dtype=torch.bfloat16, device=device)
    length = torch.tensor([tokens], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    keys, values = (torch.randn(1, kv_heads, tokens, head_dim, dtype=torch.bfloat16, device=device) for _ in "kv")
    ms = triton.testing.do_bench(lambda: triton_decode_attention(query, keys, values, length, None, scale))
    rows = [("bf16 (triton_decode)", ms, 2 * keys.numel() * 2 / ms / 1e6)]
    del keys, values
    key, value = (QuantizedKV.empty(spec, 1, kv_heads, tokens, head_dim, device) for _ in range(2))
    step = 1 << 16
    for buffers in (key, value):
        for start in range(0, tokens, step):
            chunk = torch.randn(1, kv_heads, min(step, tokens - start), head_dim, dtype=torch.bfloat16, device=device)
            quantize_into(chunk, spec, buffers, start)
    nbytes = sum(t.numel() * t.element_size() for kv in (key, value) for t in kv.tensors())
    default = dict(LAUNCH)
    try:
        for config in CONFIGS:
            LAUNCH.update(config)
            ms = triton.testing.do_bench(
                lambda: triton_quant_decode_attention(query, key, value, spec, length, None, scale)
            )
            rows.append((f"{kind} {config}", ms, nbytes / ms / 1e6))
    finally:
        LAUNCH.update(default)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="int4", choices=["int8", "int4", "fp8"])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads per call (a layer's retrieval heads)")
    parser.add_argument("--groups", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the sweep times a CUDA kernel and needs a GPU")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, {args.tokens} tokens x {args.kv_heads} KV "
          f"heads x GQA {args.groups}, head_dim {args.head_dim}; default {triton_quant_decode.LAUNCH}\n")  # fmt: skip
    print("| kernel and launch | ms | GB/s read |\n|---|---|---|")
    for label, ms, rate in sweep(args.kind, args.tokens, args.kv_heads, args.groups, args.head_dim):
        print(f"| {label} | {ms:.3f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
