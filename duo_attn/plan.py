"""The per-forward plan of a `DuoCache`: where each new token sits and which streaming slot it goes to.

What every layer shares depends only on the tokens, not on the layer, so it is computed once per forward pass (by
the patched model's pre-hook) and the layers only move tensors. Positions are per-sequence positions of real tokens
(padding is ``-1``, see masks.py). Streaming slots: ``[0, sink_size)`` hold the first ``sink_size`` real tokens of
each sequence (so left padding is never a sink); ``[sink_size, sink_size + recent_size)`` are a ring indexed by cache
index, holding the last ``recent_size`` tokens. A token in both places is kept in the sink slot only (its ring slot is
marked empty).

Two planners over one `CacheState`: `DynamicPlanner` (any chunk, shapes change from step to step) and
`StaticPlanner` (one token per step; counters live in device tensors updated in place, so every step launches the same
kernels with the same arguments and can be captured once in a CUDA graph). Which kernel serves a step is decided by
attention.py, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import DuoCacheError
from .masks import positions_from_padding

GROWTH_BLOCK = 256  # retrieval caches (and the position record) grow in blocks of this many tokens


def round_up(n: int, block: int = GROWTH_BLOCK) -> int:
    """``n`` rounded up to a multiple of ``block``."""
    return -(-int(n) // block) * block


@dataclass
class DuoStep:
    """One forward pass of ``num_new`` tokens after ``cached_before`` cache slots (padding included)."""

    num_new: int
    cached_before: int
    query_pos: torch.Tensor  # [B, Q]
    key_pos: torch.Tensor | None  # [B, cached + Q]: positions of every retrieval key; None: no padding ever
    slot_pos_before: torch.Tensor  # [B, slots]: what the streaming slots held before this step's writes
    slot_pos_after: torch.Tensor  # [B, slots]: what they hold after
    sink_size: int
    recent_size: int
    ring_src: torch.Tensor | None  # chunk indices written to the ring (None: all of them)
    ring_dst: torch.Tensor | None  # their ring slots (None: no ring)
    sink_writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (batch, chunk index, sink slot)
    memo: dict = field(default_factory=dict, repr=False)  # masks derived once per step for all layers (attention.py)

    @property
    def concat_streaming(self) -> bool:
        """A pre-fill chunk attends to the old slots plus itself, then is written; a decode token is written first."""
        return self.num_new > 1

    @property
    def position_ids(self) -> None:
        return None  # transformers derives them (or the caller passes them, e.g. for padded batches)


@dataclass
class StaticStep:
    """A one-token decode step whose inputs are device buffers with fixed addresses, rewritten in place by
    `StaticPlanner`: a step captured in a CUDA graph (or compiled) reads their current values when replayed."""

    length: torch.Tensor  # [1] int32: valid keys in the retrieval buffers after this step's write
    write_index: torch.Tensor  # [1] long: cache index of this step's token
    ring_dst: torch.Tensor | None  # [1] long: its ring slot (None: no ring)
    query_pos: torch.Tensor  # [B, 1]: its position in each sequence
    key_pos: torch.Tensor | None  # [B, capacity]: positions of the cached tokens (-1 = padding); None: no padding
    slot_pos: torch.Tensor  # [B, slots]: position in each streaming slot, -1 = empty
    num_slots: torch.Tensor  # [1] int32: sink + recent, the streaming buffers' length
    sink_slot: torch.Tensor | None  # [B, 1] long: the token's sink slot (clamped; written only where is_sink)
    is_sink: torch.Tensor | None  # [B] bool: the token is among its sequence's first sink_size real tokens;
    # both None once every sequence has its sinks, and the step skips the sink write
    num_new: int = 1

    @property
    def position_ids(self) -> torch.Tensor:
        return self.query_pos

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.length, self.write_index, self.ring_dst, self.query_pos, self.key_pos, self.slot_pos,
                self.num_slots, self.sink_slot, self.is_sink)  # fmt: skip


class CacheState:
    """What every layer of one `DuoCache` shares: the token record, the streaming slots' contents and the step
    being run. Layers hold this object, never the cache (no reference cycle keeps the cache's memory alive)."""

    def __init__(self, sink_size: int, recent_size: int):
        self.sink_size, self.recent_size = int(sink_size), int(recent_size)
        self.num_slots = self.sink_size + self.recent_size
        self.step: DuoStep | StaticStep | None = None
        self.seen = 0  # cache slots used, padding included (same count in every layer)
        self.real_seen: torch.Tensor | None = None  # [B] real tokens per sequence
        self.slot_pos: torch.Tensor | None = None  # [B, slots] position in each streaming slot, -1 = empty
        self.key_pos: torch.Tensor | None = None  # [B, capacity] position of every cached token (padding = -1)
        self.has_padding = False
        self.sinks_filled = False

    def map_batch(self, fn) -> None:
        """Apply a batch reordering/selection to the per-sequence record (beam search)."""
        for name in ("real_seen", "slot_pos", "key_pos"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))


class DynamicPlanner:
    """Plans chunks of any length: pre-fill, decoding, teacher-forced answers."""

    def __init__(self, state: CacheState):
        self.state = state

    def plan(self, padding_mask: torch.Tensor | None, num_new: int, batch_size: int, device: torch.device) -> DuoStep:
        """Plan a forward pass of ``num_new`` tokens; ``padding_mask`` (checked by the caller) is the usual 2-D mask
        (1 = real token) covering at least the new tokens."""
        st = self.state
        if st.real_seen is None:
            st.real_seen = torch.zeros(batch_size, dtype=torch.long, device=device)
            st.slot_pos = torch.full((batch_size, st.num_slots), -1, dtype=torch.long, device=device)
        elif st.real_seen.shape[0] != batch_size:
            raise DuoCacheError(f"the cache holds a batch of {st.real_seen.shape[0]}, the input has {batch_size}")

        chunk_real = None if padding_mask is None else padding_mask[:, -num_new:].to(device=device, dtype=torch.bool)
        if chunk_real is not None and bool(chunk_real.all()):
            chunk_real = None
        st.has_padding = st.has_padding or chunk_real is not None
        query_pos = st.real_seen[:, None] + positions_from_padding(chunk_real, num_new, device)
        if chunk_real is not None:
            query_pos = query_pos.masked_fill(~chunk_real, -1)
        query_pos = query_pos.expand(batch_size, num_new)

        cached = st.seen
        key_pos = self._record_positions(query_pos)
        ring_src, ring_dst, new_slots = self._plan_ring(query_pos, cached, num_new)
        sink_writes = self._plan_sinks(query_pos, new_slots)
        st.step = DuoStep(
            num_new, cached, query_pos, key_pos if st.has_padding else None, st.slot_pos, new_slots,
            st.sink_size, st.recent_size, ring_src, ring_dst, sink_writes,
        )  # fmt: skip
        st.slot_pos = new_slots
        st.real_seen = st.real_seen + (query_pos >= 0).sum(-1)
        st.seen = cached + num_new
        return st.step

    def _record_positions(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Append the new positions to the per-token record (needed for padding masks of retrieval heads)."""
        st = self.state
        n, end = st.seen, st.seen + query_pos.shape[1]
        if st.key_pos is None or end > st.key_pos.shape[1]:
            grown = query_pos.new_full((query_pos.shape[0], round_up(end)), -1)
            if st.key_pos is not None:
                grown[:, :n] = st.key_pos[:, :n]
            st.key_pos = grown
        st.key_pos[:, n:end] = query_pos
        return st.key_pos[:, :end]

    def _plan_ring(self, query_pos: torch.Tensor, cached: int, num_new: int):
        st = self.state
        new_slots = st.slot_pos.clone()
        if st.recent_size == 0:
            return None, None, new_slots
        keep = min(num_new, st.recent_size)
        src = torch.arange(num_new - keep, num_new, device=query_pos.device)
        dst = st.sink_size + torch.remainder(src + cached, st.recent_size)
        pos = query_pos[:, num_new - keep :]
        new_slots[:, dst] = pos.masked_fill(pos < st.sink_size, -1)
        return (None if keep == num_new else src), dst, new_slots

    def _plan_sinks(self, query_pos: torch.Tensor, new_slots: torch.Tensor):
        st = self.state
        if st.sinks_filled or st.sink_size == 0:
            return None
        if bool((st.real_seen >= st.sink_size).all()):
            st.sinks_filled = True  # remembered, so decoding does not synchronise on this every step
            return None
        is_sink = (query_pos >= 0) & (query_pos < st.sink_size)
        batch_idx, chunk_idx = is_sink.nonzero(as_tuple=True)
        if batch_idx.numel() == 0:
            return None
        slot_idx = query_pos[batch_idx, chunk_idx]
        new_slots[batch_idx, slot_idx] = slot_idx
        return batch_idx, chunk_idx, slot_idx


def mark_static(*tensors: torch.Tensor | None) -> None:
    """Fixed addresses for torch.compile's CUDA graphs: the compiled step reads and mutates these in place."""
    if torch.compiler.is_compiling():
        return
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.mark_static_address(tensor)


def _capturing_or_compiling() -> bool:
    """Inside a CUDA-graph capture or a torch.compile trace: no host synchronisation, no host counters."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class StaticPlanner:
    """Plans for buffers reserved for ``capacity`` tokens. Pre-fill chunks are planned eagerly (`DynamicPlanner`
    over the reserved record); one-token steps touch only device tensors with fixed addresses, sinks included, so a
    step can be captured or compiled once and replayed: it reads no Python number that changes and creates no
    tensor that outlives it. Host counters are not advanced by replays; the next pre-fill re-reads them."""

    def __init__(self, state: CacheState, capacity: int):
        self.state, self.capacity = state, capacity
        self.chunks = DynamicPlanner(state)
        self.step: StaticStep | None = None  # the decode step's device tensors, made by the first pre-fill
        self._real_seen: torch.Tensor | None = None  # the record's per-sequence counts, at a fixed address

    def plan(self, padding_mask: torch.Tensor | None, num_new: int, batch_size: int, device: torch.device):
        if num_new == 1 and self.step is not None:
            return self._decode(padding_mask, batch_size)
        return self._prefill(padding_mask, num_new, batch_size, device)

    @torch.compiler.disable
    def _prefill(self, padding_mask: torch.Tensor | None, num_new: int, batch_size: int, device: torch.device):
        st = self.state
        if self.step is not None:
            st.seen = int(self.step.length)  # replays and compiled steps advanced only the device counter
        if st.seen + num_new > self.capacity:
            raise DuoCacheError(f"the static DuoCache holds {self.capacity} tokens; {st.seen + num_new} needed")
        if st.key_pos is None:  # the whole record at once: it never grows, its address never changes
            st.key_pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)
            mark_static(st.key_pos)
        chunk = self.chunks.plan(padding_mask, num_new, batch_size, device)
        step = self.step or self._new_step(batch_size, device)
        chunk.slot_pos_before = chunk.slot_pos_before.clone()  # the fixed tensor is rewritten below
        # the chunk planner made new tensors: copy them into the fixed ones
        st.real_seen = self._real_seen.copy_(st.real_seen)
        st.slot_pos = step.slot_pos.copy_(st.slot_pos)
        step.length.fill_(st.seen)
        step.key_pos = st.key_pos if st.has_padding else None
        if st.sink_size and not st.sinks_filled:  # after this chunk (the chunk planner looked before it)
            st.sinks_filled = bool((st.real_seen >= st.sink_size).all())
        if st.sinks_filled or not st.sink_size:
            step.sink_slot = step.is_sink = None
        self.step = step
        return chunk

    def _new_step(self, batch: int, device: torch.device) -> StaticStep:
        st = self.state
        long = dict(dtype=torch.long, device=device)
        self._real_seen = torch.zeros(batch, **long)
        step = StaticStep(
            length=torch.zeros(1, dtype=torch.int32, device=device),
            write_index=torch.zeros(1, **long),
            ring_dst=torch.zeros(1, **long) if st.recent_size else None,
            query_pos=torch.zeros(batch, 1, **long),
            key_pos=None,
            slot_pos=torch.full((batch, st.num_slots), -1, **long),
            num_slots=torch.tensor([st.num_slots], dtype=torch.int32, device=device),
            sink_slot=torch.zeros(batch, 1, **long) if st.sink_size else None,
            is_sink=torch.zeros(batch, dtype=torch.bool, device=device) if st.sink_size else None,
        )
        mark_static(self._real_seen, *step.tensors())
        return step

    def _decode(self, padding_mask: torch.Tensor | None, batch_size: int) -> StaticStep:
        """One real token per sequence, all bookkeeping in place on the device. Eager calls also check the batch,
        the padding column and the capacity (they need the host)."""
        st, step = self.state, self.step
        if batch_size != step.query_pos.shape[0]:
            raise DuoCacheError(f"the cache holds a batch of {step.query_pos.shape[0]}, the input has {batch_size}")
        eager = not _capturing_or_compiling()
        if eager:
            if padding_mask is not None and not bool(padding_mask[:, -1].all()):
                raise DuoCacheError("static decoding takes real tokens only: the last column of attention_mask has a 0")
            if st.seen >= self.capacity:
                raise DuoCacheError(f"the static DuoCache is full ({self.capacity} tokens)")
        step.write_index.copy_(step.length)
        step.length.add_(1)
        step.query_pos.copy_(st.real_seen[:, None])
        if step.key_pos is not None:
            step.key_pos.index_copy_(1, step.write_index, step.query_pos)
        if step.ring_dst is not None:
            step.ring_dst.copy_(step.write_index % st.recent_size + st.sink_size)
            in_ring = step.query_pos if step.is_sink is None else step.query_pos.masked_fill(
                step.query_pos < st.sink_size, -1
            )  # a sink token's ring slot stays empty (it is kept in its sink slot)
            st.slot_pos.index_copy_(1, step.ring_dst, in_ring)
        if step.is_sink is not None:
            step.is_sink.copy_(step.query_pos[:, 0] < st.sink_size)
            step.sink_slot.copy_(step.query_pos.clamp(max=st.sink_size - 1))
            kept = torch.where(step.is_sink[:, None], step.query_pos, st.slot_pos.gather(1, step.sink_slot))
            st.slot_pos.scatter_(1, step.sink_slot, kept)
        st.real_seen.add_(1)
        st.step = step
        if eager:
            st.seen += 1
        return step
