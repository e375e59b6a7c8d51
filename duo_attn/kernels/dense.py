"""Dense attention kernels: SDPA (without cuDNN), and flash-attn when it imports (optional, CUDA, half precision)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # optional: used for unmasked attention when it imports
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

FLASH_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def use_flash_attn(query: torch.Tensor) -> bool:
    """flash-attn serves the unmasked calls (no padding) on half-precision CUDA tensors when it is installed;
    ``DUO_ATTN_FLASH_ATTN=never`` turns it off."""
    return (
        flash_attn_func is not None
        and os.environ.get("DUO_ATTN_FLASH_ATTN", "auto") != "never"
        and query.device.type in FLASH_DEVICES
        and query.dtype in FLASH_DTYPES
    )


def flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float | None
) -> torch.Tensor:
    """``[B, H, Q, D]`` in and out. flash-attn takes ``[B, Q, H, D]``, reads GQA's shared K/V heads in place, and
    aligns a causal mask bottom-right, which is exactly a chunk that follows a cache."""
    out = flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling, causal=causal
    )
    return out.transpose(1, 2)


def sdpa(q, k, v, mask, is_causal: bool, scaling: float | None) -> torch.Tensor:
    """SDPA with GQA read in place (``enable_gqa``) and without the cuDNN backend: cuDNN builds an execution plan per
    new shape, and while decoding every step is a new key length (measured on an H100, torch 2.11: 2-10 ms of CPU
    time per call). The flag is flipped directly: the ``sdpa_kernel`` context manager showed up in a profile of the
    eager decode step on that machine's slow host (it runs twice per layer and step)."""
    kwargs = {"attn_mask": mask, "is_causal": is_causal, "scale": scaling, "enable_gqa": q.shape[1] != k.shape[1]}
    if q.device.type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
