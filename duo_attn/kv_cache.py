"""The dual KV cache: a growing cache for retrieval heads, a constant sink + recent cache for streaming heads.

`DuoCache` is a transformers `Cache` made of one `DuoCacheLayer` per decoder layer. What every layer shares (token
positions, which streaming slot each new token goes to, the masks of the step) depends only on the tokens, not on
the layer, so `DuoCache.begin_step` computes it once per forward pass and the layers only move tensors.

Streaming slots: ``[0, sink_size)`` hold the first ``sink_size`` real tokens of each sequence (so left padding is
never a sink); ``[sink_size, sink_size + recent_size)`` are a ring indexed by cache index, holding the last
``recent_size`` tokens. A token in both places is kept in the sink slot only (its ring slot is marked empty).

Static decoding (`DuoCache.make_static`): the retrieval buffers are reserved up front and the step's counters live in
device tensors updated in place, so every decode step launches the same kernels with the same arguments and can be
captured once in a CUDA graph (see generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import DuoCacheError
from .kernels import BlockMask, streaming_block_mask, use_flex
from .masks import allowed_keys, positions_from_padding

GROWTH_BLOCK = 256  # retrieval caches grow in blocks of this many tokens, not by a concatenation per step


@dataclass(frozen=True)
class HeadLayout:
    """Which KV heads of one layer are retrieval heads, and which query heads read them (GQA groups)."""

    retrieval_kv: tuple[int, ...]
    streaming_kv: tuple[int, ...]
    num_kv_heads: int
    groups: int
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # derived values, computed once

    @classmethod
    def from_mask(cls, retrieval_row: np.ndarray, num_q_heads: int) -> HeadLayout:
        row = np.asarray(retrieval_row, dtype=bool)
        num_kv = row.size
        if num_q_heads % num_kv:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv} KV heads")
        return cls(
            tuple(int(h) for h in np.flatnonzero(row)),
            tuple(int(h) for h in np.flatnonzero(~row)),
            num_kv,
            num_q_heads // num_kv,
        )

    @property
    def retrieval_first(self) -> bool:
        """Retrieval heads are the first heads of the layer (the order `enable_duo_attention_eval` gives them)."""
        if "retrieval_first" not in self._memo:
            self._memo["retrieval_first"] = self.retrieval_kv == tuple(range(len(self.retrieval_kv)))
        return self._memo["retrieval_first"]

    def query_heads(self, kv_heads: tuple[int, ...]) -> tuple[int, ...]:
        key = ("query", kv_heads)
        if key not in self._memo:
            self._memo[key] = tuple(h * self.groups + g for h in kv_heads for g in range(self.groups))
        return self._memo[key]

    def device_index(self, heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The head list as an index tensor on ``device``, made once (no host-to-device copy per step)."""
        key = ("index", heads, device)
        if key not in self._memo:
            self._memo[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._memo[key]

    def head_slice(self, heads: tuple[int, ...], total: int) -> slice | None:
        """``heads`` as a slice of ``total`` heads when they are one contiguous run, else None."""
        key = ("slice", heads, total)
        if key not in self._memo:
            contiguous = heads == tuple(range(heads[0], heads[0] + len(heads)))
            self._memo[key] = slice(heads[0], heads[0] + len(heads)) if contiguous else None
        return self._memo[key]


def select_heads(x: torch.Tensor, heads: tuple[int, ...], total: int, layout: HeadLayout) -> torch.Tensor:
    """``x[:, heads]``: the tensor itself, a view when the heads are one contiguous run, else a gather."""
    if len(heads) == total:
        return x
    part = layout.head_slice(heads, total)
    return x[:, part] if part is not None else x.index_select(1, layout.device_index(heads, x.device))


@dataclass
class DuoStep:
    """What one forward pass needs from the cache, computed once for all layers by `DuoCache.begin_step`."""

    num_new: int
    cached_before: int
    query_pos: torch.Tensor  # [B, Q]
    retrieval_mask: torch.Tensor | None  # [B, 1, Q, K], or None: causal (see below) or all keys visible
    retrieval_causal: str | None  # "top_left" (nothing cached, no padding) or "lower_right" (a chunk after cache)
    streaming_mask: torch.Tensor | BlockMask | None  # [B, 1, Q, slots (+ Q when concatenating)], block mask, or None
    concat_streaming: bool  # prefill chunk: attend to old slots + the chunk, then write; decode: write, then attend
    ring_src: torch.Tensor | None  # chunk indices written to the ring
    ring_dst: torch.Tensor | None  # their ring slots
    sink_writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (batch, chunk index, sink slot)


@dataclass
class StaticStep:
    """A one-token decode step whose inputs are device buffers, rewritten in place by `DuoCache.begin_step`."""

    length: torch.Tensor  # [1] int32: valid keys in the retrieval buffers after this step's write
    write_index: torch.Tensor  # [1] long: cache index of this step's token
    ring_dst: torch.Tensor | None  # [1] long: its ring slot (None: no ring)
    query_pos: torch.Tensor  # [B, 1]: its position in each sequence
    key_pos: torch.Tensor | None  # [B, capacity]: positions of the cached tokens (-1 = padding); None: no padding
    slot_pos: torch.Tensor  # [B, slots]: position in each streaming slot, -1 = empty
    num_slots: torch.Tensor  # [1] int32: sink + recent, the streaming buffers' length
    num_new: int = 1


@dataclass
class StepPlan:
    """The step being run, shared by the cache and its layers."""

    num_slots: int
    step: DuoStep | StaticStep | None = None


@dataclass
class DuoKV:
    """What `DuoCacheLayer.update` hands to the attention function, in place of plain key/value tensors."""

    layout: HeadLayout
    step: DuoStep
    full_keys: torch.Tensor | None
    full_values: torch.Tensor | None
    streaming_keys: torch.Tensor | None
    streaming_values: torch.Tensor | None


class DuoCacheLayer(CacheLayerMixin):
    """One layer of the dual cache. Retrieval heads: ``[B, H_r, capacity, D]`` grown in blocks. Streaming heads:
    ``[B, H_s, sink + recent, D]``, constant."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layout: HeadLayout, plan: StepPlan):
        super().__init__()
        self.layout = layout
        self.plan = plan  # shared with the DuoCache; no reference back to it, so no cycle keeps memory alive
        self.length = 0
        self.full_keys = self.full_values = None
        self.stream_keys = self.stream_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, _, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        n_stream = len(self.layout.streaming_kv)
        if n_stream:
            shape = (batch, n_stream, self.plan.num_slots, head_dim)
            self.stream_keys = key_states.new_zeros(shape)
            self.stream_values = value_states.new_zeros(shape)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[DuoKV, DuoKV]:
        step = self.plan.step
        if isinstance(step, StaticStep) and key_states.shape[-2] == 1:
            return self._update_static(key_states, value_states, step)
        if step is None:
            raise DuoCacheError(
                "this DuoCache reached an attention layer without being planned for the forward pass: a model "
                "patched by enable_duo_attention_eval plans its cache in a pre-hook of the base model, so the cache "
                "was given to an unpatched model or to a layer called directly"
            )
        if isinstance(step, StaticStep) or step.cached_before != self.length or step.num_new != key_states.shape[-2]:
            raise DuoCacheError(
                f"layer got {key_states.shape[-2]} new tokens after {self.length} cached, but the cache planned "
                f"{step.num_new} after {getattr(step, 'cached_before', 'a static step')}: every forward pass must go "
                "through the patched model as a whole"
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

    def _update_static(self, key_states: torch.Tensor, value_states: torch.Tensor, step: StaticStep):
        """Write the token at device-side indices; hand over whole buffers (``step`` says which keys are valid)."""
        layout, total = self.layout, self.layout.num_kv_heads
        if layout.retrieval_kv:
            for buffer, new in ((self.full_keys, key_states), (self.full_values, value_states)):
                buffer.index_copy_(2, step.write_index, select_heads(new, layout.retrieval_kv, total, layout))
        if layout.streaming_kv and step.ring_dst is not None:
            for buffer, new in ((self.stream_keys, key_states), (self.stream_values, value_states)):
                buffer.index_copy_(2, step.ring_dst, select_heads(new, layout.streaming_kv, total, layout))
        kv = DuoKV(layout, step, self.full_keys, self.full_values, self.stream_keys, self.stream_values)
        return kv, kv

    def _append_full(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[2]
        if self.full_keys is None or end > self.full_keys.shape[2]:
            capacity = -(-end // GROWTH_BLOCK) * GROWTH_BLOCK
            self.full_keys = _grow(self.full_keys, self.length, capacity, keys)
            self.full_values = _grow(self.full_values, self.length, capacity, values)
        self.full_keys[:, :, self.length : end] = keys
        self.full_values[:, :, self.length : end] = values

    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate the retrieval cache for ``total_tokens`` tokens (no growth copies while decoding)."""
        if self.full_keys is not None and total_tokens > self.full_keys.shape[2]:
            self.full_keys = _grow(self.full_keys, self.length, total_tokens, self.full_keys)
            self.full_values = _grow(self.full_values, self.length, total_tokens, self.full_values)

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
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K/V held: the used part, or everything allocated (growth blocks included)."""
        total = 0
        if self.full_keys is not None:
            used = self.full_keys.shape[2] if allocated else self.length
            per_token = self.full_keys[:, :, :1].numel() * self.full_keys.element_size()
            total += 2 * used * per_token
        if self.stream_keys is not None:
            total += 2 * self.stream_keys.numel() * self.stream_keys.element_size()
        return total

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

    def crop(self, tokens_to_remove: int) -> None:
        raise DuoCacheError(
            "DuoCache cannot be cropped: streaming heads keep only sink + recent tokens, so removed tokens could not "
            "be restored (assisted/speculative decoding is not supported with duo attention)"
        )


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
        self.num_slots = self.sink_size + self.recent_size
        self.plan = StepPlan(self.num_slots)
        self.seen = 0  # cache slots used, padding included (same count in every layer)
        self.real_seen: torch.Tensor | None = None  # [B] real tokens per sequence
        self.slot_pos: torch.Tensor | None = None  # [B, slots] position in each streaming slot, -1 = empty
        self.key_pos: torch.Tensor | None = None  # [B, capacity] position of every cached token (padding = -1)
        self.has_padding = False
        self.sinks_filled = False
        self.static: StaticStep | None = None  # set by make_static
        self.capacity: int | None = None  # static decoding: tokens the reserved buffers hold
        layers = [DuoCacheLayer(HeadLayout.from_mask(row, num_attention_heads), self.plan) for row in mask]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model) -> DuoCache:
        """A fresh cache for a model patched by `enable_duo_attention_eval`."""
        state = getattr(model, "duo_attention", None)
        if state is None:
            raise DuoCacheError("the model is not patched: call enable_duo_attention_eval(model, pattern) first")
        return state.new_cache()

    # -- the per-forward plan ------------------------------------------------------------------------------------
    def begin_step(self, padding_mask: torch.Tensor | None, num_new: int, batch_size: int, device: torch.device):
        """Plan the next forward pass of ``num_new`` tokens: positions, masks and streaming-slot writes.

        ``padding_mask`` is the usual 2-D attention mask (1 = real token) covering at least the new tokens.
        """
        if self.static is not None:
            return self._begin_static_step(padding_mask, num_new, batch_size)
        if self.real_seen is None:
            self.real_seen = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.slot_pos = torch.full((batch_size, self.num_slots), -1, dtype=torch.long, device=device)
        elif self.real_seen.shape[0] != batch_size:
            raise DuoCacheError(f"the cache holds a batch of {self.real_seen.shape[0]}, the input has {batch_size}")

        chunk_real = None if padding_mask is None else padding_mask[:, -num_new:].to(device=device, dtype=torch.bool)
        if chunk_real is not None and bool(chunk_real.all()):
            chunk_real = None
        self.has_padding = self.has_padding or chunk_real is not None
        query_pos = self.real_seen[:, None] + positions_from_padding(chunk_real, num_new, device)
        if chunk_real is not None:
            query_pos = query_pos.masked_fill(~chunk_real, -1)
        query_pos = query_pos.expand(batch_size, num_new)

        n = self.seen
        key_pos = self._record_positions(query_pos)
        if self.has_padding:
            retrieval_mask, causal = allowed_keys(query_pos, key_pos), None
        else:
            retrieval_mask, causal = None, None if num_new == 1 else "top_left" if n == 0 else "lower_right"

        concat = num_new > 1
        old_slots = self.slot_pos
        ring_src, ring_dst, new_slots = self._plan_ring(query_pos, n, num_new)
        sink_writes = self._plan_sinks(query_pos, new_slots)
        if concat and not self.has_padding and use_flex(device, num_new):
            streaming_mask = streaming_block_mask(old_slots[0], n, num_new, self.sink_size, self.recent_size)
        elif not concat and not self.has_padding and n + 1 >= self.num_slots:
            streaming_mask = None  # decoding with a full window: every slot is visible
        else:
            stream_key_pos = torch.cat([old_slots, query_pos], dim=1) if concat else new_slots
            streaming_mask = allowed_keys(
                query_pos, stream_key_pos, sink_size=self.sink_size, recent_size=self.recent_size
            )

        self.plan.step = DuoStep(
            num_new, n, query_pos, retrieval_mask, causal, streaming_mask, concat, ring_src, ring_dst, sink_writes
        )
        self.slot_pos = new_slots
        self.real_seen = self.real_seen + (query_pos >= 0).sum(-1)
        self.seen = n + num_new
        return self.plan.step

    # -- static decoding ------------------------------------------------------------------------------------------
    def make_static(self, capacity: int) -> None:
        """Decode with static shapes from now on: every retrieval buffer is reserved for ``capacity`` tokens (rounded
        up to a growth block) and the step's counters move to device tensors updated in place, so that one decode
        step can be captured in a CUDA graph and replayed. Needs a pre-fill first, with every sequence past its sink
        tokens; while static, each forward pass must be one token per sequence. `make_dynamic` switches back.
        """
        if self.real_seen is None:
            raise DuoCacheError("make_static needs a pre-filled cache: run the prompt through the model first")
        if self.static is not None:
            raise DuoCacheError("the cache is already static")
        if capacity <= self.seen:
            raise DuoCacheError(f"capacity {capacity} leaves no room: the cache already holds {self.seen} tokens")
        if self.sink_size and not bool((self.real_seen >= self.sink_size).all()):
            raise DuoCacheError(
                f"every sequence needs at least sink_size={self.sink_size} real tokens before static decoding; "
                f"the shortest has {int(self.real_seen.min())} (decode the first tokens dynamically)"
            )
        self.sinks_filled = True
        capacity = -(-int(capacity) // GROWTH_BLOCK) * GROWTH_BLOCK
        self.reserve(capacity)
        for layer in self.layers:  # unwritten slots must be finite: a masked key still meets a 0 weight
            for buffer in (layer.full_keys, layer.full_values):
                if buffer is not None:
                    buffer[:, :, self.seen :].zero_()
        key_pos = self.key_pos.new_full((self.key_pos.shape[0], capacity), -1)
        key_pos[:, : self.seen] = self.key_pos[:, : self.seen]
        self.key_pos = key_pos
        device, batch = self.real_seen.device, self.real_seen.shape[0]
        self.static = StaticStep(
            length=torch.tensor([self.seen], dtype=torch.int32, device=device),
            write_index=torch.zeros(1, dtype=torch.long, device=device),
            ring_dst=torch.zeros(1, dtype=torch.long, device=device) if self.recent_size else None,
            query_pos=torch.zeros(batch, 1, dtype=torch.long, device=device),
            key_pos=self.key_pos if self.has_padding else None,
            slot_pos=self.slot_pos,
            num_slots=torch.tensor([self.num_slots], dtype=torch.int32, device=device),
        )
        self.capacity = capacity

    def make_dynamic(self) -> None:
        """Leave static decoding (the reserved buffers stay); pre-fill chunks are accepted again."""
        self.static = None
        self.plan.step = None

    def _begin_static_step(self, padding_mask: torch.Tensor | None, num_new: int, batch_size: int) -> StaticStep:
        """Advance the device-side counters in place: no host synchronisation, no new tensors that outlive the step."""
        st = self.static
        if num_new != 1:
            raise DuoCacheError(f"a static cache decodes one token per step, got {num_new}; call make_dynamic() first")
        if batch_size != st.query_pos.shape[0]:
            raise DuoCacheError(f"the cache holds a batch of {st.query_pos.shape[0]}, the input has {batch_size}")
        if self.seen >= self.capacity:
            raise DuoCacheError(f"the static cache is full ({self.capacity} tokens); reserve more with make_static")
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if padding_mask is not None and not capturing and not bool(padding_mask[:, -1].all()):
            raise DuoCacheError("static decoding takes real tokens only: the last column of attention_mask has a 0")
        st.write_index.copy_(st.length)
        st.length.add_(1)
        st.query_pos.copy_(self.real_seen[:, None])
        self.key_pos.index_copy_(1, st.write_index, st.query_pos)
        if st.ring_dst is not None:
            torch.remainder(st.write_index, self.recent_size, out=st.ring_dst)
            st.ring_dst.add_(self.sink_size)
            self.slot_pos.index_copy_(1, st.ring_dst, st.query_pos)
        self.real_seen.add_(1)
        if not capturing:  # a captured step advances the host counters when it is replayed (advance_host)
            self.advance_host(1)
        self.plan.step = st
        return st

    def advance_host(self, steps: int) -> None:
        """Count ``steps`` decode steps run on the device (replays of a captured step) in the host-side lengths."""
        self.seen += steps
        for layer in self.layers:
            layer.length += steps

    def _record_positions(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Append the new positions to the per-token record (needed for padding masks of retrieval heads)."""
        n, end = self.seen, self.seen + query_pos.shape[1]
        if self.key_pos is None or end > self.key_pos.shape[1]:
            capacity = -(-end // GROWTH_BLOCK) * GROWTH_BLOCK
            grown = query_pos.new_full((query_pos.shape[0], capacity), -1)
            if self.key_pos is not None:
                grown[:, :n] = self.key_pos[:, :n]
            self.key_pos = grown
        self.key_pos[:, n:end] = query_pos
        return self.key_pos[:, :end]

    def _plan_ring(self, query_pos: torch.Tensor, n: int, num_new: int):
        new_slots = self.slot_pos.clone()
        if self.recent_size == 0:
            return None, None, new_slots
        keep = min(num_new, self.recent_size)
        device = query_pos.device
        src = torch.arange(num_new - keep, num_new, device=device)
        dst = self.sink_size + torch.remainder(src + n, self.recent_size)
        pos = query_pos[:, num_new - keep :]
        new_slots[:, dst] = pos.masked_fill(pos < self.sink_size, -1)
        return (None if keep == num_new else src), dst, new_slots

    def _plan_sinks(self, query_pos: torch.Tensor, new_slots: torch.Tensor):
        if self.sinks_filled or self.sink_size == 0:
            return None
        if bool((self.real_seen >= self.sink_size).all()):
            self.sinks_filled = True  # remembered, so decoding does not synchronise on this every step
            return None
        is_sink = (query_pos >= 0) & (query_pos < self.sink_size)
        batch_idx, chunk_idx = is_sink.nonzero(as_tuple=True)
        if batch_idx.numel() == 0:
            return None
        slot_idx = query_pos[batch_idx, chunk_idx]
        new_slots[batch_idx, slot_idx] = slot_idx
        return batch_idx, chunk_idx, slot_idx

    # -- transformers Cache API ----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._require_dynamic()
        super().reorder_cache(beam_idx)
        self._map_shared(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._require_dynamic()
        super().batch_repeat_interleave(repeats)
        self._map_shared(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._require_dynamic()
        super().batch_select_indices(indices)
        self._map_shared(lambda t: t[indices])

    def _require_dynamic(self) -> None:
        if self.static is not None:
            raise DuoCacheError("a static cache cannot be reordered or resized by batch; call make_dynamic() first")

    def _map_shared(self, fn) -> None:
        for name in ("real_seen", "slot_pos", "key_pos"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reset(self) -> None:
        super().reset()
        self.plan.step = self.real_seen = self.slot_pos = self.key_pos = self.static = None
        self.seen, self.has_padding, self.sinks_filled = 0, False, False

    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate every retrieval cache for ``total_tokens`` tokens (call after the first forward pass)."""
        for layer in self.layers:
            layer.reserve(total_tokens)

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K/V held by all layers (the used part by default; ``allocated=True`` counts growth blocks)."""
        return sum(layer.nbytes(allocated) for layer in self.layers)
