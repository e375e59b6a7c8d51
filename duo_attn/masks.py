"""The attention rule of DuoAttention, written once and used by the cache, the kernels and the tests.

Positions are per-sequence token positions (padding excluded, ``-1`` marks a padding slot). For a query at position
``i``, a retrieval head attends to every key ``j <= i``; a streaming head attends to keys ``j <= i`` with
``j < sink_size`` (attention sinks) or ``i - j < recent_size`` (the recent window, the query itself included).
"""

from __future__ import annotations

import torch

from .errors import ModelError


def check_padding_mask(padding_mask: torch.Tensor | None, num_new: int, batch_size: int) -> None:
    """Duo attention builds its own masks from the usual 2-D padding mask (1 = real token), which must cover at
    least the new tokens of every sequence."""
    if padding_mask is None:
        return
    if padding_mask.dim() != 2:
        raise ModelError(
            f"duo attention builds its own masks and needs a 2-D padding mask, got shape {tuple(padding_mask.shape)}"
        )
    if padding_mask.shape[-1] < num_new or padding_mask.shape[0] != batch_size:
        raise ModelError(
            f"attention_mask of shape {tuple(padding_mask.shape)} does not cover {num_new} new tokens "
            f"of a batch of {batch_size}"
        )


def positions_from_padding(padding_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Token positions ``[B or 1, length]`` from a 2-D padding mask (1 = real token); padding gets ``-1``."""
    if padding_mask is None:
        return torch.arange(length, device=device).unsqueeze(0)
    real = padding_mask[:, -length:].to(device=device, dtype=torch.bool)
    positions = real.long().cumsum(-1) - 1
    return positions.masked_fill(~real, -1)


def allowed_keys(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    *,
    sink_size: int | None = None,
    recent_size: int | None = None,
) -> torch.Tensor:
    """Boolean mask ``[B, 1, Q, K]``: which keys each query may read.

    ``query_pos`` is ``[B, Q]``, ``key_pos`` is ``[B, K]`` (``-1`` = empty or padding). With ``sink_size`` and
    ``recent_size`` given, the streaming rule applies; otherwise the retrieval (causal) rule. A padding query
    (position ``-1``) may read every key: its output is discarded, and a fully masked row would produce NaN.
    """
    q = query_pos[:, None, :, None]
    k = key_pos[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if sink_size is not None:
        allowed = allowed & ((k < sink_size) | (q - k < recent_size))
    return allowed | (q < 0)

