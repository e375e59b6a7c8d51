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


def use_triton(device: torch.device) -> bool:
    """``DUO_ATTN_TRITON``: ``auto`` (the kernel on CUDA), ``never`` (the SDPA path) or ``always`` (the kernel on any
    device; on a CPU only under ``TRITON_INTERPRET=1``, for tests). Both decode paths (plain and quantized) ask this."""
    mode = os.environ.get("DUO_ATTN_TRITON", "auto")
    return mode == "always" or (device.type == "cuda" and mode != "never")


def valid_keys(capacity: int, length: torch.Tensor, key_pos: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[B or 1, capacity]``: a key is valid below ``length`` and, with ``key_pos``, where its position is >= 0."""
    valid = torch.arange(capacity, device=device) < length
    return valid[None] if key_pos is None else valid & (key_pos >= 0)


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

    CUDA + Triton: the split-KV kernel of triton_decode.py, reading only valid keys; otherwise a masked SDPA call
    over the whole buffer. ``DUO_ATTN_TRITON=never`` forces the SDPA path, ``always`` the kernel on any device (on a
    CPU only under ``TRITON_INTERPRET=1``: tests). ``out``: where to write (may be a view). Eager calls and compiled
    steps both go through the `decode_attention_op` operator: one code path.
    """
    out = torch.empty_like(query) if out is None else out
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    decode_attention_op(query, key, value, length, key_pos, float(scale), out)
    return out


@torch.library.custom_op("duo_attn::decode_attention", mutates_args=("out",))
def decode_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
) -> None:
    """The decode step as one opaque operator: torch.compile traces a step through it (it cannot trace a Triton
    launch whose grid is computed on the host), and its only effect is the write into ``out``."""
    if triton_decode_attention is not None and use_triton(query.device):
        triton_decode_attention(query, key, value, length, key_pos, scale, out)
        return
    valid = valid_keys(key.shape[2], length, key_pos, key.device)
    out.copy_(sdpa(query, key, value, valid[:, None, None, :], False, scale))


@decode_attention_op.register_fake
def _(query, key, value, length, key_pos, scale, out) -> None:
    return None
