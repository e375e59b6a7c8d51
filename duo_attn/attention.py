"""The attention function registered with transformers: one function for every supported architecture, and the
one place that chooses kernels.

With a `DuoCache` the cache hands over a `DuoKV` (retrieval heads' store and the step's own keys, streaming heads'
sink + recent slots, and the step's plan) or, while static, a `StaticDuoKV` (whole reserved buffers); without one
(``use_cache=False``) the same rule is applied to plain key/value tensors with explicit masks. Dense calls use SDPA,
which avoids materialising the repeated K/V of grouped-query attention (``enable_gqa``); flash-attn, when installed,
takes the unmasked CUDA calls, FlexAttention the streaming heads' pre-fill chunks, and static steps (and one-token
steps over a quantized store) the decode kernel of their store (kernels/). A step's masks are derived once, by the
first layer, and shared by the others.

Over a quantized store (``kv_quant``) a chunk of several tokens attends to the stored tokens before it,
dequantized, and to itself as computed (full precision); a one-token step reads every key from the store, its own
included, as a static step must (the decode kernel reads only the store), so dynamic and static decoding agree.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from .compat import version_note
from .errors import DuoCacheError, ModelError
from .heads import HeadLayout, merge_heads, select_heads
from .kernels.decode import decode_attention
from .kernels.dense import flash_attention, sdpa, use_flash_attn
from .kernels.flex import BlockMask, flex_streaming_attention, streaming_block_mask, use_flex
from .kernels.quant_decode import store_decode_attention
from .kv_cache import DuoKV, StaticDuoKV
from .masks import allowed_keys, positions_from_padding
from .plan import DuoStep
from .stores import QuantizedStore

ATTENTION_NAME = "duo_attn"


def duo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | DuoKV | StaticDuoKV,
    value: torch.Tensor | DuoKV | StaticDuoKV,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query [B, H, Q, D]`` in, ``[B, Q, H, D]`` out (no attention weights)."""
    spec = getattr(module, "duo_layer_spec", None)
    if spec is None:
        raise ModelError(
            f"attention module {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no duo "
            "attention layout: enable it with enable_duo_attention_eval(model, pattern)"
        )
    if query.shape[1] != spec.layout.num_q_heads:
        raise ModelError(
            f"layer {module.layer_idx} computes {query.shape[1]} query heads but its duo layout has "
            f"{spec.layout.num_q_heads}: the heads were split across processes (tensor parallelism) in a way "
            "enable_duo_attention_eval did not see"
        )
    if kwargs.get("sliding_window") is not None:
        raise ModelError(f"layer {module.layer_idx} asks for a sliding window, which duo attention does not implement")
    if isinstance(key, StaticDuoKV):
        out = _attend_static(query, key, scaling)
    elif isinstance(key, DuoKV):
        out = _attend_dynamic(query, key, scaling)
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
    if attention_mask.shape[-1] == kv_length:
        return attention_mask
    # a copy, not a view: a view's strides follow generate's growing mask, and a compiled step guards on strides
    return attention_mask[:, -kv_length:].clone(memory_format=torch.contiguous_format)


def _retrieval_masks(step: DuoStep) -> tuple[torch.Tensor | None, str | None]:
    """``(mask, causal)`` for the retrieval heads: an explicit mask once padding was seen; else none, with the causal
    alignment a chunk needs ("top_left" with nothing cached, "lower_right" after a cache; one token: all keys)."""
    if "retrieval" not in step.memo:
        if step.key_pos is not None:
            step.memo["retrieval"] = allowed_keys(step.query_pos, step.key_pos), None
        else:
            causal = None if step.num_new == 1 else "top_left" if step.cached_before == 0 else "lower_right"
            step.memo["retrieval"] = None, causal
    return step.memo["retrieval"]


def _streaming_mask(step: DuoStep, device: torch.device) -> torch.Tensor | BlockMask | None:
    """The streaming heads' mask: a FlexAttention block mask for long unpadded pre-fill chunks, none when a decode
    step sees a full window, else the exact dense rule over the slots (and the chunk)."""
    if "streaming" not in step.memo:
        padded = step.key_pos is not None
        cached, num_slots = step.cached_before, step.slot_pos_before.shape[1]
        if step.concat_streaming and not padded and use_flex(device, step.num_new):
            mask = streaming_block_mask(
                step.slot_pos_before[0], cached, step.num_new, step.sink_size, step.recent_size
            )
        elif not step.concat_streaming and not padded and cached + 1 >= num_slots:
            mask = None  # decoding with a full window: every slot is visible
        else:
            keys = torch.cat([step.slot_pos_before, step.query_pos], 1) if step.concat_streaming else step.slot_pos_after
            mask = allowed_keys(step.query_pos, keys, sink_size=step.sink_size, recent_size=step.recent_size)
        step.memo["streaming"] = mask
    return step.memo["streaming"]


def _decode_validity(step: DuoStep) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(length, key_pos)`` of a one-token dynamic step in the decode kernel's terms. A padding query may read every
    key (`allowed_keys`), so its row of ``key_pos`` is made all valid: a fully masked row would give NaN."""
    if "decode" not in step.memo:
        device = step.query_pos.device
        length = torch.full((1,), step.cached_before + 1, dtype=torch.int32, device=device)
        key_pos = None if step.key_pos is None else step.key_pos.masked_fill(step.query_pos < 0, 0)
        step.memo["decode"] = length, key_pos
    return step.memo["decode"]


def _attend_retrieval(q: torch.Tensor, kv: DuoKV, scaling: float | None) -> torch.Tensor:
    """The retrieval heads of a dynamic step: a one-token step over a quantized store through its decode kernel
    (codes read in place: no dequantized copy of the cache), anything else over `KVStore.read_with_chunk`."""
    step, store = kv.step, kv.full_store
    if step.num_new == 1 and isinstance(store, QuantizedStore):
        length, key_pos = _decode_validity(step)
        return store_decode_attention(store.prefix(step.cached_before + 1), q, length, key_pos, scaling)
    keys, values = store.read_with_chunk(step.cached_before, kv.new_keys, kv.new_values)
    mask, causal = _retrieval_masks(step)
    if mask is None and use_flash_attn(q):  # bottom-right alignment covers both causal cases
        return flash_attention(q, keys, values, causal is not None, scaling)
    if causal == "lower_right":  # flash attention's alignment for a chunk after a cache
        mask = causal_lower_right(q.shape[2], keys.shape[2])
    return sdpa(q, keys, values, mask, causal == "top_left", scaling)


def _attend_dynamic(query: torch.Tensor, kv: DuoKV, scaling: float | None) -> torch.Tensor:
    layout, step = kv.layout, kv.step
    n_q = query.shape[1]
    retrieval_out = streaming_out = None
    if layout.retrieval_kv:
        q = select_heads(query, layout.query_heads(layout.retrieval_kv), n_q, layout)
        retrieval_out = _attend_retrieval(q, kv, scaling)
    if layout.streaming_kv:
        q = select_heads(query, layout.query_heads(layout.streaming_kv), n_q, layout)
        mask = _streaming_mask(step, query.device)
        if isinstance(mask, BlockMask):
            streaming_out = flex_streaming_attention(q, kv.streaming_keys, kv.streaming_values, mask, scaling)
        elif mask is None and use_flash_attn(q):  # decoding with a full window
            streaming_out = flash_attention(q, kv.streaming_keys, kv.streaming_values, False, scaling)
        else:
            streaming_out = sdpa(q, kv.streaming_keys, kv.streaming_values, mask, False, scaling)
    return merge_heads(query, layout, retrieval_out, streaming_out)


def _attend_static(query: torch.Tensor, kv: StaticDuoKV, scaling: float | None) -> torch.Tensor:
    """A static decode step: the valid keys of the reserved buffers come from the step's device tensors. With the
    heads reordered, both groups write straight into their slices of one output (no merge)."""
    layout, step, n_q = kv.layout, kv.step, query.shape[1]
    merged = retrieval_out = streaming_out = None
    if layout.retrieval_first:
        merged = query.new_empty(query.shape)
        split = len(layout.retrieval_kv) * layout.groups
        retrieval_out, streaming_out = merged[:, :split], merged[:, split:]
    if layout.retrieval_kv:
        q = select_heads(query, layout.query_heads(layout.retrieval_kv), n_q, layout)
        retrieval_out = store_decode_attention(
            kv.full_store, q, step.length, step.key_pos, scaling, out=retrieval_out
        )
    if layout.streaming_kv:
        q = select_heads(query, layout.query_heads(layout.streaming_kv), n_q, layout)
        # the ring holds the last `recent` cache indices, all inside the window: a filled slot is a visible slot
        streaming_out = decode_attention(
            q, kv.streaming_keys, kv.streaming_values, step.num_slots, step.slot_pos, scaling, out=streaming_out
        )
    return merged if merged is not None else merge_heads(query, layout, retrieval_out, streaming_out)


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
    return merge_heads(query, layout, retrieval_out, streaming_out)


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
