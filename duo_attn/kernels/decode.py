"""The static-shape decode call: one query token per sequence over reserved buffers whose valid length lives in
device memory (safe inside a CUDA graph). Triton's split-KV kernel on GPUs (triton_decode.py), masked SDPA elsewhere."""

from __future__ import annotations

import os

import torch

from .dense import sdpa

try:  # ships with CUDA builds of torch; the static decode step uses its split-KV kernel on GPUs
    from .triton_decode import triton_decode_attention
except ImportError:
    triton_decode_attention = None


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scaling: float | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over a reserved buffer whose valid keys are ``index < length`` (a device tensor)
    and, with ``key_pos``, ``key_pos >= 0``. Static shapes and no host synchronisation: safe in a CUDA graph.

    CUDA + Triton: the split-KV kernel of decode_kernel.py, reading only valid keys; otherwise a masked SDPA call
    over the whole buffer. ``DUO_ATTN_TRITON=never`` forces the SDPA path. ``out``: where to write (may be a view).
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if (
        triton_decode_attention is not None
        and query.device.type == "cuda"
        and os.environ.get("DUO_ATTN_TRITON", "auto") != "never"
    ):
        return triton_decode_attention(query, key, value, length, key_pos, scale, out)
    valid = torch.arange(key.shape[2], device=key.device) < length
    valid = valid[None] if key_pos is None else valid & (key_pos >= 0)
    result = sdpa(query, key, value, valid[:, None, None, :], False, scale)
    return result if out is None else out.copy_(result)
