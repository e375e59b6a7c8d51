"""FlexAttention block-sparse pre-fill for streaming heads.

A pre-fill chunk of ``C`` queries attends, in a streaming head, to the ``S = sink + recent`` cached slots and to the
chunk itself, but each query reads only sinks and its last ``recent`` keys. Dense masked attention would still cost
``O(C * (S + C))``; here the block mask lists, for each 128-query block, only the key blocks that hold a sink slot or
overlap its window, so the cost is ``O(C * (S + recent + 128))``. The block lists are computed arithmetically (never
by evaluating the mask over all pairs) once per forward pass and shared by every layer; the exact token rule is
applied inside the listed blocks by the mask function.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: dense SDPA is used instead
    BlockMask = flex_attention = None

BLOCK = 128
MIN_FLEX_QUERIES = 2 * BLOCK  # below this a dense masked SDPA call is as fast


def flex_mode() -> str:
    """``DUO_ATTN_FLEX``: ``auto`` (CUDA only, the default), ``always`` (also CPU, eager: for tests) or ``never``."""
    mode = os.environ.get("DUO_ATTN_FLEX", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"DUO_ATTN_FLEX must be auto, always or never, got {mode!r}")
    return mode


def use_flex(device: torch.device, num_queries: int) -> bool:
    mode = flex_mode()
    if flex_attention is None or mode == "never":
        return False
    return num_queries >= MIN_FLEX_QUERIES and (mode == "always" or device.type == "cuda")


@dataclass
class _MaskEntry:
    block_mask: BlockMask
    base: torch.Tensor  # 0-d: position of the chunk's first query
    slots: torch.Tensor  # [slots]: position held in each cached slot


_MASKS: OrderedDict[tuple, _MaskEntry] = OrderedDict()
_MAX_MASKS = 16


def streaming_block_mask(
    slot_pos: torch.Tensor, cached: int, num_queries: int, sink_size: int, recent_size: int
) -> BlockMask:
    """Block mask for queries at positions ``cached + t`` over keys ``[slots (positions slot_pos), the chunk]``.

    Assumes no padding (positions equal cache indices), which is when the pre-fill fast path is taken. One mask is
    kept per shape; its mask function reads the positions from tensors updated in place, so the same function object
    (and the same compiled kernel) serves every chunk of that shape.
    """
    chunk_sinks = max(0, min(sink_size - cached, num_queries))
    key = (slot_pos.shape[0], num_queries, sink_size, recent_size, chunk_sinks, slot_pos.device)
    entry = _MASKS.get(key)
    if entry is None:
        entry = _build_mask(slot_pos.shape[0], num_queries, sink_size, recent_size, chunk_sinks, slot_pos.device)
        _MASKS[key] = entry
        if len(_MASKS) > _MAX_MASKS:
            _MASKS.popitem(last=False)
    _MASKS.move_to_end(key)
    entry.base.fill_(cached)
    entry.slots.copy_(slot_pos.clamp(min=-1))
    return entry.block_mask


def _build_mask(
    num_slots: int, num_queries: int, sink_size: int, recent_size: int, chunk_sinks: int, device: torch.device
) -> _MaskEntry:
    num_keys = num_slots + num_queries
    q_blocks = -(-num_queries // BLOCK)
    k_blocks = -(-num_keys // BLOCK)
    first_q = np.arange(q_blocks) * BLOCK
    last_q = np.minimum(first_q + BLOCK, num_queries) - 1
    # keys of the chunk that a query block may read: its window, plus the chunk's own sink tokens (first chunks)
    window_lo = num_slots + np.maximum(first_q - recent_size + 1, 0)
    window_hi = num_slots + last_q
    indices = np.zeros((q_blocks, k_blocks), dtype=np.int32)  # flex expects one column per key block
    counts = []
    for q in range(q_blocks):
        blocks = set(range(-(-num_slots // BLOCK)))  # the cached slots (sink + ring), a few blocks at most
        blocks.update(range(window_lo[q] // BLOCK, window_hi[q] // BLOCK + 1))
        if chunk_sinks:
            blocks.update(range(num_slots // BLOCK, (num_slots + min(chunk_sinks, last_q[q] + 1) - 1) // BLOCK + 1))
        row = sorted(b for b in blocks if b < k_blocks)
        indices[q, : len(row)] = row
        counts.append(len(row))
    base = torch.zeros((), dtype=torch.long, device=device)
    slots = torch.full((num_slots,), -1, dtype=torch.long, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        query_pos = base + q_idx
        in_slots = kv_idx < num_slots
        key_pos = torch.where(in_slots, slots[kv_idx.clamp(max=num_slots - 1)], base + kv_idx - num_slots)
        visible = (key_pos >= 0) & (key_pos <= query_pos)
        return visible & ((key_pos < sink_size) | (query_pos - key_pos < recent_size))

    block_mask = BlockMask.from_kv_blocks(
        torch.tensor(counts, dtype=torch.int32, device=device)[None, None],
        torch.from_numpy(indices).to(device)[None, None],
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(num_queries, num_keys),
    )
    return _MaskEntry(block_mask, base, slots)


_compiled = None
FLEX_HEAD_GROUP = 8  # KV heads per FlexAttention call


def flex_streaming_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, scaling: float | None
) -> torch.Tensor:
    """FlexAttention (compiled on CUDA, eager elsewhere) over the streaming heads, ``FLEX_HEAD_GROUP`` KV heads (and
    their query groups) per call.

    Layers have different numbers of streaming heads. Calls of a fixed head count keep every call the same shape, so
    the kernel is compiled once per chunk shape instead of once per head count, while each call still has enough
    heads to fill the GPU. A short last group is padded by repeating its last head; those outputs are dropped.
    """
    global _compiled
    fn = flex_attention
    if query.device.type == "cuda":
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
        fn = _compiled
    num_kv, groups = key.shape[1], query.shape[1] // key.shape[1]
    size = min(FLEX_HEAD_GROUP, num_kv) if query.device.type != "cuda" else FLEX_HEAD_GROUP
    out = torch.empty_like(query)
    for first in range(0, num_kv, size):
        count = min(size, num_kv - first)
        kv_heads = torch.arange(first, first + size, device=key.device).clamp(max=num_kv - 1)
        q_heads = (kv_heads[:, None] * groups + torch.arange(groups, device=key.device)).flatten()
        # gathers give contiguous tensors of one shape whatever the layer's head count (strides are compile guards)
        q, k, v = query.index_select(1, q_heads), key.index_select(1, kv_heads), value.index_select(1, kv_heads)
        part = fn(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)
        out[:, first * groups : (first + count) * groups] = part[:, : count * groups]
    return out
