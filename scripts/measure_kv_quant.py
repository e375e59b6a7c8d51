"""Which KV quantization grouping loses least on a real model: per-token channel groups (duo_attn.kv_quant) or KIVI's
per-channel keys (one scale per channel over a group of tokens)?

Runs SmolLM2 (or another causal LM) over real text once, capturing every layer's post-RoPE queries, keys and values
through a registered attention function, and reports the relative error of each layer's attention output
softmax(qK^T)V (all causal queries) when K, V or both are dequantized, plus the text's perplexity when every layer
attends to dequantized K/V. Per-channel keys reuse duo_attn.kv_quant on the transposed keys (same float16 scale/zero
rounding), with every token quantized: KIVI's full-precision residual of the last tokens (up to a group) is not
modelled; it would lower KIVI's error a little further, at the cost of those tokens' full-precision bytes.
Prints markdown (the tables of docs/kv_quant.md).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from duo_attn.kv_quant import KV_QUANT_KINDS, KVQuantSpec, dequantize, quantize
from duo_attn.learn.data import encode_haystack, load_haystack
from duo_attn.models import decoder_layers, load_model

PROBE_ATTENTION = "duo_attn_kv_probe"
Transform = Callable[[torch.Tensor], torch.Tensor]


class KVProbe:
    """Shared by all layers: records their attention inputs, or attends to transformed (dequantized) K/V."""

    def __init__(self) -> None:
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
        self.key_transform: Transform | None = None
        self.value_transform: Transform | None = None


def probe_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: causal attention over whole sequences, capturing or transforming K/V."""
    probe: KVProbe = module.duo_kv_probe
    if probe.key_transform is None and probe.value_transform is None:
        probe.captured[module.layer_idx] = (query, key, value, scaling)
    else:
        key, value = probe.key_transform(key), probe.value_transform(value)
    out = causal_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )


def per_token(kind: str, group: int) -> Transform:
    spec = KVQuantSpec(kind, group)
    return lambda x: dequantize(quantize(x, spec), spec, x.dtype)


def per_channel(kind: str, tokens: int) -> Transform:
    """KIVI's key grouping: each channel's values over ``tokens`` consecutive tokens share a scale (and zero)."""
    spec = KVQuantSpec(kind, tokens)
    return lambda x: dequantize(quantize(x.transpose(2, 3), spec), spec, x.dtype).transpose(2, 3)


def rotated_per_token(kind: str, group: int, head_dim: int) -> Transform:
    """Per-token groups after an orthonormal Hadamard rotation of the head's channels, which spreads outlier channels
    over all of them (QuaRot's idea): q.k and p @ V survive if queries and outputs are rotated too."""
    if head_dim & (head_dim - 1):
        raise SystemExit(f"the Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
    rotation = torch.ones(1, 1)
    while rotation.shape[0] < head_dim:
        rotation = torch.cat([torch.cat([rotation, rotation], 1), torch.cat([rotation, -rotation], 1)])
    rotation = rotation / math.sqrt(head_dim)
    quantized = per_token(kind, group)
    return lambda x: quantized(x @ rotation.to(x.dtype)) @ rotation.T.to(x.dtype)


def exact(x: torch.Tensor) -> torch.Tensor:
    return x


def bytes_per_value(kind: str, group: int) -> float:
    """Bytes per cached element (per token and channel), codes plus float16 scales (and zeros)."""
    code = 0.5 if kind == "int4" else 1.0
    params = 2 * (1 if kind == "fp8" else 2)
    return code + params / group  # per-token: per `group` channels; per-channel: per `group` tokens


def attention_error(probe: KVProbe, key_transform: Transform, value_transform: Transform) -> tuple[float, float]:
    """Mean and max over layers of ||O_quantized - O|| / ||O||."""
    errors = []
    for query, key, value, scaling in probe.captured.values():
        reference = causal_attention(query, key, value, scaling)
        approx = causal_attention(query, key_transform(key), value_transform(value), scaling)
        errors.append(float((approx - reference).norm() / reference.norm()))
    return sum(errors) / len(errors), max(errors)


def perplexity(model: nn.Module, probe: KVProbe, ids: torch.Tensor, key_t: Transform, value_t: Transform) -> float:
    probe.key_transform, probe.value_transform = key_t, value_t
    try:
        return math.exp(float(model(input_ids=ids, labels=ids, use_cache=False).loss))
    finally:
        probe.key_transform = probe.value_transform = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/measure_kv_quant.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline) or a local model directory")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per text window (a multiple of 128)")
    p.add_argument("--windows", type=int, default=2, help="text windows (a batch), evenly spaced in the haystack")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokens % 128:
        raise SystemExit("--tokens must be a multiple of 128 (per-channel groups of up to 128 tokens)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    stream = encode_haystack(tokenizer, load_haystack())
    stride = (len(stream) - args.tokens) // args.windows
    ids = torch.tensor([stream[i * stride : i * stride + args.tokens] for i in range(args.windows)])

    probe = KVProbe()
    AttentionInterface.register(PROBE_ATTENTION, probe_attention_forward)
    for layer in decoder_layers(model):
        layer.self_attn.duo_kv_probe = probe
    model.set_attn_implementation(PROBE_ATTENTION)
    model.base_model(input_ids=ids, use_cache=False)
    cfg = model.config
    print(f"{args.model}: {cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads of dim "
          f"{cfg.head_dim}; {args.windows} windows x {args.tokens} tokens of the default haystack\n")  # fmt: skip

    groupings = {
        "per-token g16": (lambda kind: per_token(kind, 16), "token", 16),
        "per-token g32": (lambda kind: per_token(kind, 32), "token", 32),
        "per-token g64": (lambda kind: per_token(kind, 64), "token", 64),
        "per-token g32, Hadamard-rotated": (lambda kind: rotated_per_token(kind, 32, cfg.head_dim), "token", 32),
        "per-channel t32": (lambda kind: per_channel(kind, 32), "channel", 32),
        "per-channel t128": (lambda kind: per_channel(kind, 128), "channel", 128),
    }
    head = ["grouping"] + [f"{kind} mean / max" for kind in KV_QUANT_KINDS]
    for tensor in ("keys", "values"):
        print(f"Relative attention-output error, {tensor} quantized (the other exact), mean / max over layers:\n")
        print(_row(head) + "\n" + _row(["---"] * len(head)))
        for name, (make, grouping, _) in groupings.items():
            if tensor == "values" and grouping == "channel":
                continue  # KIVI quantizes values per token too
            cells = [name]
            for kind in KV_QUANT_KINDS:
                pair = (make(kind), exact) if tensor == "keys" else (exact, make(kind))
                mean, worst = attention_error(probe, *pair)
                cells.append(f"{mean:.2e} / {worst:.2e}")
            print(_row(cells))
        print()

    combos = {
        "per-token g32 (K and V)": ("per-token g32", "per-token g32"),
        "per-token g64 (K and V)": ("per-token g64", "per-token g64"),
        "per-token g16 (K and V)": ("per-token g16", "per-token g16"),
        "per-token g32, Hadamard-rotated (K and V)": ("per-token g32, Hadamard-rotated",) * 2,
        "KIVI: per-channel t32 K, per-token g32 V": ("per-channel t32", "per-token g32"),
    }
    base = perplexity(model, probe, ids, exact, exact)
    print(f"K and V quantized: attention-output error (mean / max over layers) and perplexity (exact: {base:.4f})\n")
    head = ["K / V grouping", "kind", "bytes per element", "attention error mean / max", "perplexity"]
    print(_row(head) + "\n" + _row(["---"] * len(head)))
    for name, (key_grouping, value_grouping) in combos.items():
        for kind in KV_QUANT_KINDS:
            make_k, _, k_group = groupings[key_grouping]
            make_v, _, v_group = groupings[value_grouping]
            key_t, value_t = make_k(kind), make_v(kind)
            size = (bytes_per_value(kind, k_group) + bytes_per_value(kind, v_group)) / 2
            mean, worst = attention_error(probe, key_t, value_t)
            ppl = perplexity(model, probe, ids, key_t, value_t)
            print(_row([name, kind, f"{size:.4g}", f"{mean:.2e} / {worst:.2e}", f"{ppl:.4f}"]))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
