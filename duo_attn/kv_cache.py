"""The dual KV cache: a growing cache for retrieval heads, a constant sink + recent cache for streaming heads.

`DuoCache` is a transformers `Cache` made of one layer per decoder layer, all sharing one `CacheState` (plan.py): the
patched model's pre-hook plans each forward pass once (`DuoCache.begin_step`), and the layers only store and hand
over tensors. Two layer types over the same buffers, as transformers separates ``DynamicLayer`` and ``StaticLayer``:

- `DuoCacheLayer`: retrieval buffers grow in blocks; any chunk length; beam search reorders it.
- `StaticDuoCacheLayer` (of a `StaticDuoCache`): buffers reserved for a fixed capacity at the first pre-fill, whose
  addresses never change; a decode step writes its token at device-side indices, so the step can be compiled by
  transformers' ``generate`` or captured in a CUDA graph (generate.py) and replayed.

The retrieval heads' keys and values live in a `KVStore` (stores.py): dense in the model dtype, or quantized as they
are written with ``kv_quant`` (kv_quant.py; docs/kv_quant.md). The layers never ask which: growth, beam reorders and
byte counts go through the store. Streaming heads keep sink + recent slots in the model dtype.

Storage and transformers' Cache API only: which kernel attends over what a layer hands over is attention.py's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import DuoCacheError
from .heads import HeadLayout, select_heads
from .kv_quant import KVQuantSpec, resolve_kv_quant
from .plan import GROWTH_BLOCK, CacheState, DuoStep, DynamicPlanner, StaticPlanner, StaticStep, mark_static, round_up
from .stores import KVStore, make_store

__all__ = [
    "GROWTH_BLOCK", "DuoCache", "DuoCacheLayer", "DuoKV", "StaticDuoCache", "StaticDuoCacheLayer", "StaticDuoKV",
    "round_up",
]  # fmt: skip


@dataclass
class DuoKV:
    """What a dynamic layer hands the attention function in place of plain key/value tensors: the retrieval heads'
    store (the step's tokens already written) with the step's retrieval keys and values as computed, the streaming
    heads' slots (plus the chunk, when concatenating), and the step's plan. The store is read by attention.py,
    which picks the kernel, so a quantized store is dequantized only where it is attended over."""

    layout: HeadLayout
    step: DuoStep
    full_store: KVStore | None
    new_keys: torch.Tensor | None  # [B, H_r, num_new, D]
    new_values: torch.Tensor | None
    streaming_keys: torch.Tensor | None
    streaming_values: torch.Tensor | None


@dataclass
class StaticDuoKV:
    """What a static layer hands over: its whole reserved store and streaming buffers; the step says which are valid."""

    layout: HeadLayout
    step: StaticStep
    full_store: KVStore | None
    streaming_keys: torch.Tensor | None
    streaming_values: torch.Tensor | None


class _DuoLayerStorage(CacheLayerMixin):
    """The buffers of one layer. Retrieval heads: a `KVStore` of ``[B, H_r, capacity, *]`` buffers. Streaming heads:
    ``[B, H_s, sink + recent, D]`` in the model dtype, constant."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layout: HeadLayout, state: CacheState, kv_quant: str | KVQuantSpec | None = None):
        super().__init__()
        self.layout, self.state, self.kv_quant = layout, state, kv_quant
        self.spec: KVQuantSpec | None = None  # kv_quant resolved for the head_dim, at the first write
        self.store: KVStore | None = None
        self.stream_keys = self.stream_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, _, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.spec = resolve_kv_quant(self.kv_quant, head_dim, self.device)
        n_stream = len(self.layout.streaming_kv)
        if n_stream:
            shape = (batch, n_stream, self.state.num_slots, head_dim)
            self.stream_keys = key_states.new_zeros(shape)
            self.stream_values = value_states.new_zeros(shape)
        self.is_initialized = True

    def _attend_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor, step: DuoStep, start: int):
        """Write a planned chunk (retrieval heads at ``[start, start + n)``, streaming heads into their slots) and
        hand over what it attends over: the store with the chunk's retrieval keys, the streaming slots."""
        layout, total = self.layout, self.layout.num_kv_heads
        full_k = full_v = stream_k = stream_v = None
        if layout.retrieval_kv:
            full_k = select_heads(key_states, layout.retrieval_kv, total, layout)
            full_v = select_heads(value_states, layout.retrieval_kv, total, layout)
            self._write_full(full_k, full_v, start)
        if layout.streaming_kv:
            new_k = select_heads(key_states, layout.streaming_kv, total, layout)
            new_v = select_heads(value_states, layout.streaming_kv, total, layout)
            if step.concat_streaming:
                stream_k = torch.cat([self.stream_keys, new_k], dim=2)
                stream_v = torch.cat([self.stream_values, new_v], dim=2)
                self._write_streaming(new_k, new_v, step)
            else:
                self._write_streaming(new_k, new_v, step)
                stream_k, stream_v = self.stream_keys, self.stream_values
        return (DuoKV(layout, step, self.store, full_k, full_v, stream_k, stream_v),) * 2

    def _write_streaming(self, new_k: torch.Tensor, new_v: torch.Tensor, step: DuoStep) -> None:
        if step.ring_dst is not None:
            src = step.ring_src
            self.stream_keys.index_copy_(2, step.ring_dst, new_k.index_select(2, src) if src is not None else new_k)
            self.stream_values.index_copy_(2, step.ring_dst, new_v.index_select(2, src) if src is not None else new_v)
        if step.sink_writes is not None:
            b, t, s = step.sink_writes
            self.stream_keys[b, :, s] = new_k[b, :, t]
            self.stream_values[b, :, s] = new_v[b, :, t]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K/V held (a quantized store's scales and zeros included): the used part, or everything
        allocated (growth blocks included)."""
        total = 0
        if self.store is not None:
            total += self.store.nbytes(None if allocated else self.get_seq_length())
        if self.stream_keys is not None:
            total += 2 * self.stream_keys.numel() * self.stream_keys.element_size()
        return total

    def crop(self, tokens_to_remove: int) -> None:
        raise DuoCacheError(
            "DuoCache cannot be cropped: streaming heads keep only sink + recent tokens, so removed tokens could not "
            "be restored (assisted/speculative decoding is not supported with duo attention)"
        )


class DuoCacheLayer(_DuoLayerStorage):
    """A dynamic layer: retrieval buffers grow in `GROWTH_BLOCK` steps, not by a concatenation per step."""

    def __init__(self, layout: HeadLayout, state: CacheState, kv_quant: str | KVQuantSpec | None = None):
        super().__init__(layout, state, kv_quant)
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[DuoKV, DuoKV]:
        step = self.state.step
        if step is None:
            raise DuoCacheError(
                "this DuoCache reached an attention layer without being planned for the forward pass: a model "
                "patched by enable_duo_attention_eval plans its cache in a pre-hook of the base model, so the cache "
                "was given to an unpatched model or to a layer called directly"
            )
        if step.cached_before != self.length or step.num_new != key_states.shape[-2]:
            raise DuoCacheError(
                f"layer got {key_states.shape[-2]} new tokens after {self.length} cached, but the cache planned "
                f"{step.num_new} after {step.cached_before}: every forward pass must go through the patched model"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv = self._attend_chunk(key_states, value_states, step, self.length)
        self.length += step.num_new
        return kv

    def _write_full(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        end = start + keys.shape[2]
        if self.store is None:
            batch, heads, _, head_dim = keys.shape
            self.store = make_store(self.spec, batch, heads, round_up(end), head_dim, self.dtype, self.device)
        elif end > self.store.capacity:
            self.store = self.store.grow(round_up(end), start)
        self.store.write(keys, values, start)

    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate the retrieval cache for ``total_tokens`` tokens (no growth copies while decoding)."""
        if self.store is not None and total_tokens > self.store.capacity:
            self.store = self.store.grow(total_tokens, self.length)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.store = self.stream_keys = self.stream_values = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        """A batch map (beam reorder, repeat, selection) into new buffers: the store's and the streaming slots'."""
        if self.store is not None:
            self.store = self.store.map_batch(fn)
        for name in ("stream_keys", "stream_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])


class StaticDuoCacheLayer(_DuoLayerStorage):
    """A static layer: buffers reserved for ``capacity`` tokens at the first pre-fill, at fixed addresses. Pre-fill
    chunks are written like a dynamic layer's; a decode step writes its token at the step's device-side indices
    (retrieval index, ring slot and, while a sequence is short, its sink slot) and hands over the whole buffers."""

    is_compileable = True

    def __init__(
        self, layout: HeadLayout, state: CacheState, capacity: int, kv_quant: str | KVQuantSpec | None = None
    ):
        super().__init__(layout, state, kv_quant)
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, _, _, head_dim = key_states.shape
        if self.layout.retrieval_kv:
            heads = len(self.layout.retrieval_kv)
            self.store = make_store(self.spec, batch, heads, self.capacity, head_dim, self.dtype, self.device)
            self.store.zero_from(0)  # a masked key must still be finite
            self.store.mark_static()
        mark_static(self.stream_keys, self.stream_values)
        self.layout.warm(key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.state.step
        if step is None:
            raise DuoCacheError("this StaticDuoCache reached a layer without a planned step (an unpatched model?)")
        if not isinstance(step, StaticStep):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return self._attend_chunk(key_states, value_states, step, step.cached_before)
        if not self.is_initialized:
            raise DuoCacheError("a static decode step needs a pre-filled cache")
        layout, total = self.layout, self.layout.num_kv_heads
        if layout.retrieval_kv:
            self.store.write_at(
                select_heads(key_states, layout.retrieval_kv, total, layout),
                select_heads(value_states, layout.retrieval_kv, total, layout),
                step.write_index,
            )
        if layout.streaming_kv:
            for buffer, new in ((self.stream_keys, key_states), (self.stream_values, value_states)):
                new = select_heads(new, layout.streaming_kv, total, layout)
                if step.ring_dst is not None:
                    buffer.index_copy_(2, step.ring_dst, new)
                if step.is_sink is not None:  # per sequence: write the token, or put back what the slot holds
                    index = step.sink_slot[:, None, :, None].expand(new.shape)
                    buffer.scatter_(2, index, torch.where(step.is_sink[:, None, None, None], new, buffer.gather(2, index)))
        kv = StaticDuoKV(layout, step, self.store, self.stream_keys, self.stream_values)
        return kv, kv

    def _write_full(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        self.store.write(keys, values, start)

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Only the new tokens' padding column: the cache records positions itself, and a mask of constant shape
        keeps a compiled decode step from being traced again at every step."""
        return query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In place: the buffers keep their addresses (a compiled or captured step holds them)."""
        if self.store is not None:
            self.store.copy_batch_(lambda t: t.index_select(0, beam_idx.to(t.device)))
        for tensor in (self.stream_keys, self.stream_values):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def _refuse(self, *args) -> None:
        raise DuoCacheError("a static DuoCache has a fixed batch size: it cannot be repeated or sub-selected")

    batch_repeat_interleave = batch_select_indices = _refuse

    def reset(self) -> None:
        self.store = self.stream_keys = self.stream_values = None
        self.is_initialized = False


class DuoCache(Cache):
    """Dual KV cache for a DuoAttention-patched model.

    Built from a retrieval-head mask ``[L, H_kv]`` (True = retrieval head) and the streaming window sizes. The
    patched model calls `begin_step` before each forward pass; `nbytes` reports the memory held.

    ``kv_quant``: ``None`` (retrieval heads in the model dtype), ``"int8"``, ``"int4"`` or ``"fp8"`` (optionally
    with a group, ``"int4-g32"``), or a `KVQuantSpec`: the retrieval heads' keys and values are quantized as they
    are written. A name's default group is fitted to the model's head_dim at the first write. ``for_model`` gives
    the cache the model was patched with; the patched model refuses a cache of another ``kv_quant``.
    """

    def __init__(
        self,
        retrieval_mask: np.ndarray,
        sink_size: int,
        recent_size: int,
        num_attention_heads: int,
        kv_quant: str | KVQuantSpec | None = None,
    ):
        resolve_kv_quant(kv_quant)  # an unknown name fails here, before anything is built
        mask = np.asarray(retrieval_mask, dtype=bool)
        self.retrieval_mask = mask
        self.sink_size, self.recent_size = int(sink_size), int(recent_size)
        self.num_attention_heads = num_attention_heads
        self.kv_quant = kv_quant
        self.state = CacheState(self.sink_size, self.recent_size)
        self.planner = self._new_planner()
        layers = [DuoCacheLayer(HeadLayout.from_mask(row, num_attention_heads), self.state, kv_quant) for row in mask]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model) -> DuoCache:
        """A fresh cache for a model patched by `enable_duo_attention_eval` (its pattern, windows and kv_quant)."""
        state = getattr(model, "duo_attention", None)
        if state is None:
            raise DuoCacheError("the model is not patched: call enable_duo_attention_eval(model, pattern) first")
        return state.new_cache()

    def begin_step(
        self, padding_mask: torch.Tensor | None, num_new: int, batch_size: int, device: torch.device
    ) -> DuoStep | StaticStep:
        """Plan the next forward pass of ``num_new`` tokens for every layer (the patched model's pre-hook calls it)."""
        return self.planner.plan(padding_mask, num_new, batch_size, device)

    # -- the record every layer shares ----------------------------------------------------------------------------
    @property
    def seen(self) -> int:
        """Cache slots used, padding included."""
        return self.state.seen

    @property
    def real_seen(self) -> torch.Tensor | None:
        """``[B]`` real tokens per sequence."""
        return self.state.real_seen

    # -- transformers Cache API ----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.state.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.state.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.state.map_batch(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.state = CacheState(self.sink_size, self.recent_size)
        self.planner = self._new_planner()
        for layer in self.layers:
            layer.state = self.state

    def _new_planner(self) -> DynamicPlanner | StaticPlanner:
        return DynamicPlanner(self.state)

    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate every retrieval cache for ``total_tokens`` tokens (call after the first forward pass)."""
        for layer in self.layers:
            layer.reserve(total_tokens)

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K/V held by all layers (the used part by default; ``allocated=True`` counts growth blocks)."""
        return sum(layer.nbytes(allocated) for layer in self.layers)


class StaticDuoCache(DuoCache):
    """A compileable `DuoCache` for ``capacity`` tokens (padding included; rounded up to a growth block).

    transformers' ``generate`` compiles its decode step for it (``enable_duo_attention_eval(compile_generate=True)``
    makes generate build one where it would compile), and `generate.StaticDecoder` captures its step in a CUDA graph.
    Pre-fill chunks of any length are accepted; a decode step is one real token per sequence.
    """

    def __init__(
        self,
        retrieval_mask: np.ndarray,
        sink_size: int,
        recent_size: int,
        num_attention_heads: int,
        capacity: int,
        kv_quant: str | KVQuantSpec | None = None,
    ):
        self.capacity = round_up(capacity)
        super().__init__(retrieval_mask, sink_size, recent_size, num_attention_heads, kv_quant)
        self.layers = [StaticDuoCacheLayer(lyr.layout, self.state, self.capacity, kv_quant) for lyr in self.layers]

    def early_initialization(
        self, batch_size: int, num_heads: int | list[int], head_dim: int | list[int], dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Reserve every layer's buffers now, as transformers' `StaticCache` does before it compiles a chunked
        pre-fill: buffers first allocated inside a CUDA-graph-captured call would live in that graph's memory pool,
        where the next replay overwrites them. ``num_heads`` is the Cache signature's; the pattern fixes the heads."""
        head_dims = {head_dim} if isinstance(head_dim, int) else set(head_dim)
        if len(head_dims) != 1:
            raise DuoCacheError(f"a StaticDuoCache needs one head_dim for every layer, got {sorted(head_dims)}")
        empty = torch.empty(batch_size, 0, 0, head_dims.pop(), dtype=dtype, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(empty, empty)

    @classmethod
    def for_model(cls, model, capacity: int) -> StaticDuoCache:  # type: ignore[override]
        """A fresh compileable cache for ``capacity`` tokens, for a model patched by `enable_duo_attention_eval`
        (its pattern, windows and kv_quant)."""
        state = getattr(model, "duo_attention", None)
        if state is None:
            raise DuoCacheError("the model is not patched: call enable_duo_attention_eval(model, pattern) first")
        return state.new_cache(capacity)

    def _new_planner(self) -> StaticPlanner:
        return StaticPlanner(self.state, self.capacity)

    @property
    def static_step(self) -> StaticStep | None:
        """The device buffers every decode step rewrites in place (the inputs a captured step reads); None before the
        first pre-fill."""
        return self.planner.step

    def advance_host(self, steps: int) -> None:
        """Count ``steps`` decode steps replayed on the device in the host-side length."""
        self.state.seen += steps

    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        """A device tensor once filled, as transformers' static layers do: reading it costs no synchronisation, and a
        compiled step does not specialise on it."""
        step = self.planner.step
        return 0 if step is None else step.length[0]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In place (see `StaticDuoCacheLayer.reorder_cache`)."""
        Cache.reorder_cache(self, beam_idx)
        for tensor in (self.state.real_seen, self.state.slot_pos, self.state.key_pos):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))
