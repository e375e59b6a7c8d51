"""Where the retrieval heads' keys and values live: one small class per storage format, one interface for all.

A cache layer holds a `KVStore` and never asks which kind it is: `DenseStore` keeps ``[B, H, capacity, D]`` tensors
in the model dtype, `QuantizedStore` the codes, scales and zeros of kv_quant.py. Both write a pre-fill chunk at a
host-side offset and a decode token at a device-side index (``index_copy_``: no host synchronisation, so a static
step can be captured in a CUDA graph or compiled), and read back the first tokens in the model dtype (`read`;
`read_with_chunk` for what a pre-fill chunk attends over: the stored tokens before it, then the chunk as computed).
Attention over a store in a decode step is kernels/quant_decode.py's `store_decode_attention`, not a method here:
choosing kernels stays in kernels/.

Everything that only moves buffers (grow, zero, batch maps, byte counts, static addresses) is written once in
`KVStore` over `tensors()`: every buffer of a store is ``[B, H, capacity, *]``, so a token-range or batch operation
is the same on each.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from .kv_quant import KVQuantSpec, QuantizedKV, dequantize, quantize_into

BatchFn = Callable[[torch.Tensor], torch.Tensor]
READ_BLOCK = 1 << 16  # tokens a quantized read dequantizes at a time (bounds its fp32 temporaries)


class KVStore(ABC):
    """Keys and values of ``capacity`` token slots for ``heads`` heads of ``batch`` sequences."""

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every buffer, each ``[B, H, capacity, *]`` (keys' first, then values')."""

    @abstractmethod
    def _over(self, tensors: Sequence[torch.Tensor]) -> KVStore:
        """The same format over other buffers, given in `tensors` order."""

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @abstractmethod
    def _write(self, keys: torch.Tensor, values: torch.Tensor, slots: int | torch.Tensor) -> None:
        """Store checked tokens: at ``[slots, slots + N)`` for an int, at ``slots[i]`` for a tensor."""

    @abstractmethod
    def _read(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _read_with_chunk(
        self, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def batch(self) -> int:
        return self.tensors()[0].shape[0]

    @property
    def heads(self) -> int:
        return self.tensors()[0].shape[1]

    @property
    def capacity(self) -> int:
        """Token slots held (written or not)."""
        return self.tensors()[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def write(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Write a chunk ``[B, H, N, D]`` at slots ``[start, start + N)``. Invalid arguments raise ``ValueError``
        before anything is written."""
        self._check_tokens(keys, values, start)
        self._write(keys, values, start)

    def write_at(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """Write ``N`` tokens at the slots of a long device tensor ``index [N]`` (a static step's write index). Only
        shapes are checked, never the index's values (that would synchronise): no host sync, CUDA-graph and
        torch.compile safe."""
        self._check_tokens(keys, values, index)
        self._write(keys, values, index)

    def read(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``end`` slots, ``[B, H, end, D]`` in ``dtype``. A dense store in its own
        dtype returns views; a quantized store dequantizes into a new, transient copy."""
        if not 0 <= end <= self.capacity:
            raise ValueError(f"cannot read {end} tokens from a store of {self.capacity}")
        return self._read(end, dtype)

    def read_with_chunk(
        self, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a pre-fill chunk ``keys, values [B, H, N, D]``, already written at slot ``start``, attends over
        (``[B, H, start + N, D]`` in the chunk's dtype): the ``start`` tokens before it as stored, then the chunk as
        computed. A dense store stores the chunk exactly and returns views; a quantized store returns a transient
        copy of its dequantized tokens followed by the chunk in full precision (one layer's, freed after that
        layer's attention), so no full-precision copy of the context outlives a layer."""
        self._check_tokens(keys, values, start)
        return self._read_with_chunk(start, keys, values)

    def prefix(self, end: int) -> KVStore:
        """The same store over views of its first ``end`` slots (no copy): a decode kernel then reads no slot past
        them, when a growing store holds more slots than tokens."""
        if not 0 <= end <= self.capacity:
            raise ValueError(f"a store of {self.capacity} slots has no prefix of {end}")
        return self._over([t[:, :, :end] for t in self.tensors()])

    def grow(self, capacity: int, used: int) -> KVStore:
        """A new store of ``capacity`` slots holding this one's first ``used`` tokens (the rest uninitialised)."""
        if not 0 <= used <= min(capacity, self.capacity):
            raise ValueError(f"cannot keep {used} tokens when growing a store of {self.capacity} to {capacity}")
        grown = self._over([t.new_empty((*t.shape[:2], capacity, *t.shape[3:])) for t in self.tensors()])
        for new, old in zip(grown.tensors(), self.tensors()):
            new[:, :, :used] = old[:, :, :used]
        return grown

    def zero_from(self, start: int) -> None:
        """Zero every buffer from slot ``start`` on, so that unwritten slots read as finite 0 values (a masked key
        must still meet a weight of 0, not NaN). Zero codes, scales and zeros dequantize to 0 in every kind."""
        for t in self.tensors():
            t[:, :, start:].zero_()

    def map_batch(self, fn: BatchFn) -> KVStore:
        """A new store of ``fn`` (a batch reorder, selection or repeat along dim 0) applied to every buffer."""
        return self._over([_on_bytes(fn, t) for t in self.tensors()])

    def copy_batch_(self, fn: BatchFn) -> None:
        """Apply a batch reorder ``fn`` in place: the buffers keep their addresses, as a captured (CUDA-graph) or
        compiled step over them requires. ``fn`` must return new tensors of the same shapes (e.g. ``index_select``);
        otherwise ``ValueError`` and nothing is changed."""
        mapped = [_on_bytes(fn, t) for t in self.tensors()]
        for old, new in zip(self.tensors(), mapped):
            if new.shape != old.shape:
                raise ValueError(
                    f"copy_batch_ keeps the buffers, so fn must keep their shapes: {tuple(old.shape)} became "
                    f"{tuple(new.shape)}; use map_batch to change the batch"
                )
        for old, new in zip(self.tensors(), mapped):
            old.copy_(new)

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes that ``tokens`` token slots (default: all of them) take in every buffer, scales and zeros included."""
        tokens = self.capacity if tokens is None else tokens
        if not 0 <= tokens <= self.capacity:
            raise ValueError(f"a store of {self.capacity} slots holds no {tokens} tokens")
        per_token = sum(math.prod(t.shape[:2]) * math.prod(t.shape[3:]) * t.element_size() for t in self.tensors())
        return tokens * per_token

    def mark_static(self) -> None:
        """Tell torch.compile that every buffer keeps its address (cudagraph trees then need no copy of it). Skipped
        while compiling: dynamo refuses the call inside a graph, where a layer may create its store lazily."""
        if torch.compiler.is_compiling():
            return
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)

    def _check_tokens(self, keys: torch.Tensor, values: torch.Tensor, slots: int | torch.Tensor) -> None:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                f"keys and values must be [B, H, N, D] of one shape, got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        batch, heads, num_new, head_dim = keys.shape
        if (batch, heads, head_dim) != (self.batch, self.heads, self.head_dim):
            raise ValueError(
                f"tokens of {tuple(keys.shape)} do not fit a store of batch {self.batch}, {self.heads} heads of "
                f"dim {self.head_dim}"
            )
        if keys.device != self.device or values.device != self.device:
            raise ValueError(f"tokens on {keys.device} / {values.device}, store on {self.device}")
        if isinstance(slots, torch.Tensor):
            if slots.shape != (num_new,) or slots.dtype != torch.long or slots.device != self.device:
                raise ValueError(
                    f"index must be a long tensor of the {num_new} token slots on {self.device}, got "
                    f"{tuple(slots.shape)} {slots.dtype} on {slots.device}"
                )
        elif not 0 <= slots <= self.capacity - num_new:
            raise ValueError(f"{num_new} tokens at slot {slots} do not fit a store of {self.capacity}")


def _on_bytes(fn: BatchFn, t: torch.Tensor) -> torch.Tensor:
    """``fn(t)``, applied to float8 buffers as bytes: not every index kernel takes float8 (``index_copy_`` has none
    on CPU), and a batch map only moves elements."""
    if t.dtype != torch.float8_e4m3fn:
        return fn(t)
    return fn(t.view(torch.uint8)).view(t.dtype)


class DenseStore(KVStore):
    """Keys and values ``[B, H, capacity, D]`` in the model dtype."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        if keys.dim() != 4 or keys.shape != values.shape or keys.dtype != values.dtype:
            raise ValueError(
                f"dense keys and values must be [B, H, capacity, D] of one shape and dtype, got {tuple(keys.shape)} "
                f"{keys.dtype} and {tuple(values.shape)} {values.dtype}"
            )
        self.keys, self.values = keys, values

    @classmethod
    def empty(
        cls, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> DenseStore:
        shape = (batch, heads, capacity, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values

    def _over(self, tensors: Sequence[torch.Tensor]) -> DenseStore:
        return DenseStore(*tensors)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, slots: int | torch.Tensor) -> None:
        for buffer, new in ((self.keys, keys), (self.values, values)):
            if isinstance(slots, torch.Tensor):
                buffer.index_copy_(2, slots, new.to(buffer.dtype))
            else:
                buffer[:, :, slots : slots + new.shape[2]] = new

    def _read(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, :end].to(dtype), self.values[:, :, :end].to(dtype)

    def _read_with_chunk(
        self, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(start + keys.shape[2], keys.dtype)


class QuantizedStore(KVStore):
    """Keys and values as `QuantizedKV` codes of ``spec`` (layouts in kv_quant.py); tokens are quantized as they are
    written, so only the tokens being written are ever held in full precision."""

    def __init__(self, keys: QuantizedKV, values: QuantizedKV, spec: KVQuantSpec):
        self.keys, self.values, self.spec = keys, values, spec

    @classmethod
    def empty(
        cls, spec: KVQuantSpec, batch: int, heads: int, capacity: int, head_dim: int, device: torch.device | str
    ) -> QuantizedStore:
        """Uninitialised buffers; ``ValueError`` (before allocating) if ``spec`` cannot serve these heads there."""
        keys = QuantizedKV.empty(spec, batch, heads, capacity, head_dim, device)
        return cls(keys, QuantizedKV.empty(spec, batch, heads, capacity, head_dim, device), spec)

    @property
    def head_dim(self) -> int:
        return self.keys.scale.shape[3] * self.spec.group_size

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys.tensors() + self.values.tensors()

    def _over(self, tensors: Sequence[torch.Tensor]) -> QuantizedStore:
        half = len(tensors) // 2
        keys, values = tensors[:half], tensors[half:]
        if self.spec.has_zero:
            return QuantizedStore(QuantizedKV(*keys), QuantizedKV(*values), self.spec)
        return QuantizedStore(QuantizedKV(*keys, None), QuantizedKV(*values, None), self.spec)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, slots: int | torch.Tensor) -> None:
        quantize_into(keys, self.spec, self.keys, slots)
        quantize_into(values, self.spec, self.values, slots)

    def _read(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch, self.heads, end, self.head_dim)
        keys, values = (torch.empty(shape, dtype=dtype, device=self.device) for _ in range(2))
        self._dequantize_into(keys, self.keys)
        self._dequantize_into(values, self.values)
        return keys, values

    def _read_with_chunk(
        self, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for codes, chunk in ((self.keys, keys), (self.values, values)):
            both = chunk.new_empty((*chunk.shape[:2], start + chunk.shape[2], chunk.shape[3]))
            self._dequantize_into(both[:, :, :start], codes)
            both[:, :, start:] = chunk
            out.append(both)
        return out[0], out[1]

    def _dequantize_into(self, out: torch.Tensor, codes: QuantizedKV) -> None:
        """Dequantize the first ``out.shape[2]`` tokens into ``out``, `READ_BLOCK` tokens at a time: the fp32
        arithmetic of `dequantize` then needs a block's temporaries, not the whole context's."""
        for start in range(0, out.shape[2], READ_BLOCK):
            end = min(start + READ_BLOCK, out.shape[2])
            block = codes.map(lambda t: t[:, :, start:end])  # noqa: B023 (used at once)
            out[:, :, start:end] = dequantize(block, self.spec, out.dtype)


def make_store(
    spec: KVQuantSpec | None,
    batch: int,
    heads: int,
    capacity: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> KVStore:
    """An empty store: dense in ``dtype`` without a spec, else quantized (``dtype`` is then only what reads return,
    passed to `KVStore.read`). ``ValueError`` if the spec cannot serve ``head_dim`` on ``device``."""
    if spec is None:
        return DenseStore.empty(batch, heads, capacity, head_dim, dtype, device)
    return QuantizedStore.empty(spec, batch, heads, capacity, head_dim, device)
