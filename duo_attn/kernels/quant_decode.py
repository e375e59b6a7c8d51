"""The static-shape decode call over a quantized KV cache, and the one function a static step calls for a store.

`quant_decode_attention` goes through the custom op ``duo_attn::quant_decode_attention``: torch.compile (and so a
compiled, CUDA-graphed decode step) sees one opaque call that writes its ``out`` argument, instead of tracing into
Triton's launcher or the reference's dequantization. Inside the op: the Triton kernel on CUDA
(triton_quant_decode.py, dequantizing in registers, reading only valid keys), else dequantize + masked SDPA.
"""

from __future__ import annotations

import torch

from ..kv_quant import KVQuantSpec, QuantizedKV, dequantize
from ..stores import DenseStore, KVStore, QuantizedStore
from .decode import decode_attention, use_triton, valid_keys
from .dense import sdpa

try:  # ships with CUDA builds of torch; the quantized decode step uses its kernel on GPUs
    from .triton_quant_decode import triton_quant_decode_attention
except ImportError:
    triton_quant_decode_attention = None

OP_NAME = "duo_attn::quant_decode_attention"


def reference_quant_decode_attention(
    query: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    spec: KVQuantSpec,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize the whole buffers, then masked SDPA: the no-Triton path and the kernel's reference. Keys are valid
    at index ``< length`` with ``key_pos >= 0`` (if given); the others are zeroed first, since unwritten slots of
    `QuantizedKV.empty` buffers may decode to NaN."""
    capacity = key.data.shape[2]
    valid = valid_keys(capacity, length, key_pos, query.device)
    keep = valid[:, None, :, None]
    k = torch.where(keep, dequantize(key, spec, query.dtype), 0)
    v = torch.where(keep, dequantize(value, spec, query.dtype), 0)
    result = sdpa(query, k, v, valid[:, None, None, :], False, scale)
    return result if out is None else out.copy_(result)


@torch.library.custom_op(OP_NAME, mutates_args=("out",))
def _quant_decode_op(
    query: torch.Tensor,
    key_data: torch.Tensor,
    key_scale: torch.Tensor,
    key_zero: torch.Tensor | None,
    value_data: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor | None,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scale: float,
    kind: str,
    group_size: int,
    out: torch.Tensor,
) -> None:
    """Plain tensors in (an op's schema knows no dataclasses), the result written into ``out``. Codes come as uint8
    bytes in every kind (fp8 codes viewed as bytes: torch's schema checks cannot compare float8 tensors on CPU);
    ``*_zero`` is None for fp8. The kernel is chosen here, at run time, so a compiled graph holds no device or
    environment test."""
    spec = KVQuantSpec(kind, group_size)
    key_data, value_data = key_data.view(spec.data_dtype), value_data.view(spec.data_dtype)
    key, value = QuantizedKV(key_data, key_scale, key_zero), QuantizedKV(value_data, value_scale, value_zero)
    if triton_quant_decode_attention is not None and use_triton(query.device):
        triton_quant_decode_attention(query, key, value, spec, length, key_pos, scale, out)
    else:
        reference_quant_decode_attention(query, key, value, spec, length, key_pos, scale, out)


@_quant_decode_op.register_fake
def _(query, key_data, key_scale, key_zero, value_data, value_scale, value_zero, length, key_pos, scale, kind,
      group_size, out) -> None:  # fmt: skip
    """Nothing to describe: the op returns nothing and only writes ``out``, whose shape the caller fixed."""


def quant_decode_attention(
    query: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    spec: KVQuantSpec,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scaling: float | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence, ``query [B, H_kv * G, 1, D]``, over quantized buffers ``[B, H_kv, capacity,
    *]`` whose valid keys are ``index < length`` (a 1-element int32 device tensor) and, with ``key_pos [B,
    capacity]``, ``key_pos >= 0``; at least one valid key per sequence. Static shapes, no host synchronisation: safe
    in a CUDA graph and under torch.compile (one custom op). ``DUO_ATTN_TRITON=never`` forces the reference path.
    ``out``: where to write the ``[B, H_kv * G, 1, D]`` result (may be a view); returned."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.empty_like(query) if out is None else out
    _quant_decode_op(
        query, key.data.view(torch.uint8), key.scale, key.zero, value.data.view(torch.uint8), value.scale,
        value.zero, length, key_pos, float(scale), spec.kind, spec.group_size, out,
    )  # fmt: skip
    return out


def store_decode_attention(
    store: KVStore,
    query: torch.Tensor,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scaling: float | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A static decode step over a store's whole buffers (the contract of `decode_attention`): the one place that
    maps a storage format to its kernel, so cache layers and attention.py never branch on quantization."""
    if isinstance(store, QuantizedStore):
        return quant_decode_attention(query, store.keys, store.values, store.spec, length, key_pos, scaling, out=out)
    if isinstance(store, DenseStore):
        return decode_attention(query, store.keys, store.values, length, key_pos, scaling, out=out)
    raise TypeError(f"no decode kernel for a {type(store).__name__}")
