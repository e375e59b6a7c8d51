"""The attention function registered with transformers: one function for every supported architecture.

With a `DuoCache` the cache hands over a `DuoKV` (retrieval heads' full cache, streaming heads' sink + recent slots,
and the masks of the step); without one (``use_cache=False``, or a foreign cache) the same rule is applied to plain
key/value tensors with explicit masks. Both paths use SDPA, which on CPU and GPU avoids materialising the repeated
K/V of grouped-query attention (``enable_gqa``); flash-attn, when installed, takes the unmasked CUDA calls, and
FlexAttention the streaming heads' pre-fill chunks (see kernels.py).
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from .compat import version_note
from .errors import DuoCacheError, ModelError
from .kernels import BlockMask, decode_attention, flash_attention, flex_streaming_attention, sdpa, use_flash_attn
from .kv_cache import DuoKV, HeadLayout, StaticStep, select_heads
from .masks import allowed_keys, positions_from_padding

ATTENTION_NAME = "duo_attn"


def duo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | DuoKV,
    value: torch.Tensor | DuoKV,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query [B, H, Q, D]`` in, ``[B, Q, H, D]`` out (no attention weights)."""
    spec = getattr(module, "duo_layer_spec", None)
    if spec is None:
        raise ModelError(
            f"attention module {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no duo "
            "attention layout: enable it with enable_duo_attention_eval(model, pattern)"
        )
    if kwargs.get("sliding_window") is not None:
        raise ModelError(f"layer {module.layer_idx} asks for a sliding window, which duo attention does not implement")
    if isinstance(key, DuoKV):
        out = _attend_cached(query, key, scaling)
    elif spec.forward.cached or key.shape[2] != query.shape[2]:
        # keys that did not come from the DuoCache the pre-hook planned: some other cache holds this layer's keys
        raise DuoCacheError(
            f"layer {module.layer_idx} received plain keys instead of its DuoCache under {version_note()}: the "
            "model handed the cache to its layers in a way duo-attn does not patch, so it refuses to run"
        )
    else:
        out = _attend_uncached(query, key, value, attention_mask, spec, scaling)
    return out.transpose(1, 2).contiguous(), None


def duo_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask interface: duo attention needs only the 2-D padding mask; the rule is applied per head."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def _merge_heads(
    query: torch.Tensor, layout: HeadLayout, retrieval_out: torch.Tensor | None, streaming_out: torch.Tensor | None
) -> torch.Tensor:
    """Put the two head groups' outputs back in the model's head order."""
    if streaming_out is None:
        return retrieval_out
    if retrieval_out is None:
        return streaming_out
    if layout.retrieval_first:  # heads reordered at enable time
        return torch.cat([retrieval_out, streaming_out], dim=1)
    out = query.new_empty(query.shape)
    out.index_copy_(1, layout.device_index(layout.query_heads(layout.retrieval_kv), out.device), retrieval_out)
    out.index_copy_(1, layout.device_index(layout.query_heads(layout.streaming_kv), out.device), streaming_out)
    return out


def _attend_cached(query: torch.Tensor, kv: DuoKV, scaling: float | None) -> torch.Tensor:
    layout, step = kv.layout, kv.step
    n_q = query.shape[1]
    retrieval_out = streaming_out = None
    if isinstance(step, StaticStep):
        return _attend_static(query, kv, step, scaling)
    if layout.retrieval_kv:
        q = select_heads(query, layout.query_heads(layout.retrieval_kv), n_q, layout)
        mask = step.retrieval_mask
        if mask is None and use_flash_attn(q):
            causal = step.retrieval_causal is not None  # bottom-right alignment covers both causal cases
            retrieval_out = flash_attention(q, kv.full_keys, kv.full_values, causal, scaling)
        else:
            if step.retrieval_causal == "lower_right":  # flash attention's alignment for a chunk after a cache
                mask = causal_lower_right(q.shape[2], kv.full_keys.shape[2])
            is_causal = step.retrieval_causal == "top_left"
            retrieval_out = sdpa(q, kv.full_keys, kv.full_values, mask, is_causal, scaling)
    if layout.streaming_kv:
        q = select_heads(query, layout.query_heads(layout.streaming_kv), n_q, layout)
        if isinstance(step.streaming_mask, BlockMask):
            streaming_out = flex_streaming_attention(q, kv.streaming_keys, kv.streaming_values, step.streaming_mask, scaling)
        elif step.streaming_mask is None and use_flash_attn(q):  # decoding with a full window
            streaming_out = flash_attention(q, kv.streaming_keys, kv.streaming_values, False, scaling)
        else:
            streaming_out = sdpa(q, kv.streaming_keys, kv.streaming_values, step.streaming_mask, False, scaling)
    return _merge_heads(query, layout, retrieval_out, streaming_out)


def _attend_static(query: torch.Tensor, kv: DuoKV, step: StaticStep, scaling: float | None) -> torch.Tensor:
    """A static decode step: the valid keys of the reserved buffers come from the step's device tensors. With the
    heads reordered, both groups write straight into their slices of one output (no merge)."""
    layout, n_q = kv.layout, query.shape[1]
    merged = retrieval_out = streaming_out = None
    if layout.retrieval_first:
        merged = query.new_empty(query.shape)
        split = len(layout.retrieval_kv) * layout.groups
        retrieval_out, streaming_out = merged[:, :split], merged[:, split:]
    if layout.retrieval_kv:
        q = select_heads(query, layout.query_heads(layout.retrieval_kv), n_q, layout)
        retrieval_out = decode_attention(
            q, kv.full_keys, kv.full_values, step.length, step.key_pos, scaling, out=retrieval_out
        )
    if layout.streaming_kv:
        q = select_heads(query, layout.query_heads(layout.streaming_kv), n_q, layout)
        # the ring holds the last `recent` cache indices, all inside the window: a filled slot is a visible slot
        streaming_out = decode_attention(
            q, kv.streaming_keys, kv.streaming_values, step.num_slots, step.slot_pos, scaling, out=streaming_out
        )
    return merged if merged is not None else _merge_heads(query, layout, retrieval_out, streaming_out)


def _attend_uncached(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding_mask: torch.Tensor | None,
    spec: LayerSpec,
    scaling: float | None,
) -> torch.Tensor:
    """The rule on full key/value tensors (the queries are the last ``Q`` of ``K`` tokens)."""
    layout, n_q, n_kv = spec.layout, query.shape[1], key.shape[1]
    positions = positions_from_padding(padding_mask, key.shape[2], query.device)
    query_pos = positions[:, -query.shape[2] :]
    retrieval_out = streaming_out = None
    if layout.retrieval_kv:
        mask = allowed_keys(query_pos, positions)
        q = select_heads(query, layout.query_heads(layout.retrieval_kv), n_q, layout)
        k, v = (select_heads(t, layout.retrieval_kv, n_kv, layout) for t in (key, value))
        retrieval_out = sdpa(q, k, v, mask, False, scaling)
    if layout.streaming_kv:
        mask = allowed_keys(query_pos, positions, sink_size=spec.sink_size, recent_size=spec.recent_size)
        q = select_heads(query, layout.query_heads(layout.streaming_kv), n_q, layout)
        k, v = (select_heads(t, layout.streaming_kv, n_kv, layout) for t in (key, value))
        streaming_out = sdpa(q, k, v, mask, False, scaling)
    return _merge_heads(query, layout, retrieval_out, streaming_out)


class ForwardFlags:
    """What the pre-hook tells every layer about the forward pass under way (one object shared by all layers)."""

    def __init__(self) -> None:
        self.cached = False  # a DuoCache was planned: every layer must receive its keys from it


class LayerSpec:
    """What the attention function needs to know about its layer; attached to the attention module by the patch."""

    def __init__(self, layout: HeadLayout, sink_size: int, recent_size: int, forward: ForwardFlags):
        self.layout, self.sink_size, self.recent_size, self.forward = layout, sink_size, recent_size, forward

    def __repr__(self) -> str:
        return (
            f"LayerSpec(retrieval_kv={self.layout.retrieval_kv}, streaming_kv={self.layout.streaming_kv}, "
            f"sink={self.sink_size}, recent={self.recent_size})"
        )
