"""The dual KV cache: a growing cache for retrieval heads, a constant sink + recent cache for streaming heads.

`DuoCache` is a transformers `Cache` made of one layer per decoder layer, all sharing one `CacheState` (plan.py): the
patched model's pre-hook plans each forward pass once (`DuoCache.begin_step`), and the layers only store and hand
over tensors. Two layer types over the same buffers, as transformers separates ``DynamicLayer`` and ``StaticLayer``:

- `DuoCacheLayer`: retrieval buffers grow in blocks; any chunk length; beam search reorders it.
- `StaticDuoCacheLayer` (after `DuoCache.make_static`): buffers reserved up front, one token per step written at
  device-side indices, so a decode step can be captured in a CUDA graph (see generate.py).

Storage and transformers' Cache API only: which kernel attends over what a layer hands over is attention.py's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import DuoCacheError
from .heads import HeadLayout, select_heads
from .plan import GROWTH_BLOCK, CacheState, DuoStep, DynamicPlanner, StaticPlanner, StaticStep, round_up

__all__ = ["GROWTH_BLOCK", "DuoCache", "DuoCacheLayer", "DuoKV", "StaticDuoCacheLayer", "StaticDuoKV", "round_up"]


@dataclass
class DuoKV:
    """What a dynamic layer hands the attention function in place of plain key/value tensors: the retrieval heads'
    keys so far and the streaming heads' slots (plus the chunk, when concatenating), with the step's plan."""

    layout: HeadLayout
    step: DuoStep
    full_keys: torch.Tensor | None
    full_values: torch.Tensor | None
    streaming_keys: torch.Tensor | None
    streaming_values: torch.Tensor | None


@dataclass
class StaticDuoKV:
    """What a static layer hands over: whole reserved buffers; the step's device tensors say which keys are valid."""

    layout: HeadLayout
    step: StaticStep
    full_keys: torch.Tensor | None
    full_values: torch.Tensor | None
    streaming_keys: torch.Tensor | None
    streaming_values: torch.Tensor | None


class _DuoLayerStorage(CacheLayerMixin):
    """The buffers of one layer. Retrieval heads: ``[B, H_r, capacity, D]``. Streaming heads: ``[B, H_s, sink +
    recent, D]``, constant."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layout: HeadLayout, state: CacheState):
        super().__init__()
        self.layout, self.state = layout, state
        self.full_keys = self.full_values = None
        self.stream_keys = self.stream_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, _, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        n_stream = len(self.layout.streaming_kv)
        if n_stream:
            shape = (batch, n_stream, self.state.num_slots, head_dim)
            self.stream_keys = key_states.new_zeros(shape)
            self.stream_values = value_states.new_zeros(shape)
        self.is_initialized = True

    def _adopt(self, other: _DuoLayerStorage) -> None:
        """Take over another layer's buffers (a switch between the dynamic and the static type)."""
        for name in ("full_keys", "full_values", "stream_keys", "stream_values", "is_initialized"):
            setattr(self, name, getattr(other, name))
        if other.is_initialized:
            self.dtype, self.device = other.dtype, other.device

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K/V held: the used part, or everything allocated (growth blocks included)."""
        total = 0
        if self.full_keys is not None:
            used = self.full_keys.shape[2] if allocated else self.get_seq_length()
            per_token = self.full_keys[:, :, :1].numel() * self.full_keys.element_size()
            total += 2 * used * per_token
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

    def __init__(self, layout: HeadLayout, state: CacheState):
        super().__init__(layout, state)
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
        layout, total = self.layout, self.layout.num_kv_heads
        full_k = full_v = stream_k = stream_v = None
        if layout.retrieval_kv:
            self._append_full(
                select_heads(key_states, layout.retrieval_kv, total, layout),
                select_heads(value_states, layout.retrieval_kv, total, layout),
            )
            end = self.length + step.num_new
            full_k, full_v = self.full_keys[:, :, :end], self.full_values[:, :, :end]
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
        self.length += step.num_new
        return (DuoKV(layout, step, full_k, full_v, stream_k, stream_v),) * 2

    def _append_full(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[2]
        if self.full_keys is None or end > self.full_keys.shape[2]:
            self.full_keys = _grow(self.full_keys, self.length, round_up(end), keys)
            self.full_values = _grow(self.full_values, self.length, round_up(end), values)
        self.full_keys[:, :, self.length : end] = keys
        self.full_values[:, :, self.length : end] = values

    def _write_streaming(self, new_k: torch.Tensor, new_v: torch.Tensor, step: DuoStep) -> None:
        if step.ring_dst is not None:
            src = step.ring_src
            self.stream_keys.index_copy_(2, step.ring_dst, new_k.index_select(2, src) if src is not None else new_k)
            self.stream_values.index_copy_(2, step.ring_dst, new_v.index_select(2, src) if src is not None else new_v)
        if step.sink_writes is not None:
            b, t, s = step.sink_writes
            self.stream_keys[b, :, s] = new_k[b, :, t]
            self.stream_values[b, :, s] = new_v[b, :, t]

    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate the retrieval cache for ``total_tokens`` tokens (no growth copies while decoding)."""
        if self.full_keys is not None and total_tokens > self.full_keys.shape[2]:
            self.full_keys = _grow(self.full_keys, self.length, total_tokens, self.full_keys)
            self.full_values = _grow(self.full_values, self.length, total_tokens, self.full_values)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.full_keys = self.full_values = self.stream_keys = self.stream_values = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        for name in ("full_keys", "full_values", "stream_keys", "stream_values"):
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
    """A static layer: buffers reserved for the cache's capacity, one token per step written at the step's
    device-side indices; the whole buffers are handed over and the step says which keys are valid."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.state.step
        if not isinstance(step, StaticStep) or key_states.shape[-2] != 1:
            raise DuoCacheError("a static cache decodes one planned token per step; call make_dynamic() first")
        layout, total = self.layout, self.layout.num_kv_heads
        if layout.retrieval_kv:
            for buffer, new in ((self.full_keys, key_states), (self.full_values, value_states)):
                buffer.index_copy_(2, step.write_index, select_heads(new, layout.retrieval_kv, total, layout))
        if layout.streaming_kv and step.ring_dst is not None:
            for buffer, new in ((self.stream_keys, key_states), (self.stream_values, value_states)):
                buffer.index_copy_(2, step.ring_dst, select_heads(new, layout.streaming_kv, total, layout))
        kv = StaticDuoKV(layout, step, self.full_keys, self.full_values, self.stream_keys, self.stream_values)
        return kv, kv

    def get_seq_length(self) -> int:
        return self.state.seen  # advanced when a step is planned (or, for graph replays, by DuoCache.advance_host)

    def _refuse(self, *args) -> None:
        raise DuoCacheError("a static cache cannot be reordered or resized by batch; call make_dynamic() first")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _refuse


def _grow(old: torch.Tensor | None, used: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    shape = (*like.shape[:2], capacity, like.shape[3])
    grown = like.new_empty(shape)
    if old is not None and used:
        grown[:, :, :used] = old[:, :, :used]
    return grown


class DuoCache(Cache):
    """Dual KV cache for a DuoAttention-patched model.

    Built from a retrieval-head mask ``[L, H_kv]`` (True = retrieval head) and the streaming window sizes. The
    patched model calls `begin_step` before each forward pass; `nbytes` reports the memory held.
    """

    def __init__(self, retrieval_mask: np.ndarray, sink_size: int, recent_size: int, num_attention_heads: int):
        mask = np.asarray(retrieval_mask, dtype=bool)
        self.retrieval_mask = mask
        self.sink_size, self.recent_size = int(sink_size), int(recent_size)
        self.num_attention_heads = num_attention_heads
        self.state = CacheState(self.sink_size, self.recent_size)
        self.planner: DynamicPlanner | StaticPlanner = DynamicPlanner(self.state)
        layers = [DuoCacheLayer(HeadLayout.from_mask(row, num_attention_heads), self.state) for row in mask]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model) -> DuoCache:
        """A fresh cache for a model patched by `enable_duo_attention_eval`."""
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

    # -- static decoding ------------------------------------------------------------------------------------------
    @property
    def is_static(self) -> bool:
        return isinstance(self.planner, StaticPlanner)

    @property
    def capacity(self) -> int | None:
        """Tokens the reserved buffers hold while static; None while dynamic."""
        return self.planner.capacity if self.is_static else None

    @property
    def static_step(self) -> StaticStep | None:
        """The device buffers every static step rewrites in place (the inputs a captured step reads)."""
        return self.planner.step if self.is_static else None

    def make_static(self, capacity: int) -> None:
        """Decode with static shapes from now on: every retrieval buffer is reserved for ``capacity`` tokens (rounded
        up to a growth block) and the step's counters move to device tensors updated in place, so that one decode
        step can be captured in a CUDA graph and replayed. Needs a pre-fill first, with every sequence past its sink
        tokens; while static, each forward pass must be one token per sequence. `make_dynamic` switches back.
        """
        st = self.state
        if st.real_seen is None:
            raise DuoCacheError("make_static needs a pre-filled cache: run the prompt through the model first")
        if self.is_static:
            raise DuoCacheError("the cache is already static")
        if capacity <= st.seen:
            raise DuoCacheError(f"capacity {capacity} leaves no room: the cache already holds {st.seen} tokens")
        if self.sink_size and not bool((st.real_seen >= self.sink_size).all()):
            raise DuoCacheError(
                f"every sequence needs at least sink_size={self.sink_size} real tokens before static decoding; "
                f"the shortest has {int(st.real_seen.min())} (decode the first tokens dynamically)"
            )
        capacity = round_up(capacity)
        self.reserve(capacity)
        layers = []
        for layer in self.layers:
            for buffer in (layer.full_keys, layer.full_values):  # unwritten slots must be finite: a masked key
                if buffer is not None:  # still meets a 0 weight
                    buffer[:, :, st.seen :].zero_()
            static = StaticDuoCacheLayer(layer.layout, st)
            static._adopt(layer)
            layers.append(static)
        self.layers = layers
        self.planner = StaticPlanner(st, capacity)

    def make_dynamic(self) -> None:
        """Leave static decoding (the reserved buffers stay); pre-fill chunks are accepted again."""
        layers = []
        for layer in self.layers:
            dynamic = DuoCacheLayer(layer.layout, self.state)
            dynamic._adopt(layer)
            dynamic.length = self.state.seen
            layers.append(dynamic)
        self.layers = layers
        self.planner = DynamicPlanner(self.state)
        self.state.step = None

    def advance_host(self, steps: int) -> None:
        """Count ``steps`` decode steps run on the device (replays of a captured step) in the host-side length."""
        self.state.seen += steps

    # -- transformers Cache API ----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # a static layer refuses before anything is changed
        self.state.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.state.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.state.map_batch(lambda t: t[indices])

    def reset(self) -> None:
        if self.is_static:
            self.make_dynamic()
        super().reset()
        self.state = CacheState(self.sink_size, self.recent_size)
        self.planner = DynamicPlanner(self.state)
        for layer in self.layers:
            layer.state = self.state

    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate every retrieval cache for ``total_tokens`` tokens (call after the first forward pass)."""
        for layer in self.layers:
            layer.reserve(total_tokens)

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K/V held by all layers (the used part by default; ``allocated=True`` counts growth blocks)."""
        return sum(layer.nbytes(allocated) for layer in self.layers)
