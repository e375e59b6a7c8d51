"""The KV quantizer: int8, int4 and fp8 codes with one scale per group of a token's channels. Attention over the
codes is kernels/quant_decode.py's, storage in a cache layer stores.py's.

Grouping: every group is ``group_size`` consecutive channels of ONE token of one head (per-token groups). A token's
codes never depend on other tokens, so appending a chunk or a decode step's token quantizes only the new tokens and
never rewrites old ones, and a static decode step writes its token with one ``index_copy_`` per tensor.
KIVI-style per-channel keys (a scale per channel over a group of tokens) must keep a full-precision residual of the
tokens that do not yet fill a group. Measured on SmolLM2-135M's real post-RoPE keys and values (2 x 1024 tokens,
``scripts/measure_kv_quant.py``, tables in docs/kv_quant.md; perplexity with every attention reading dequantized K/V,
exact 12.913): per-channel keys are clearly better at int4 (13.13 against 13.63 for per-token groups of 32, at the
same 0.625 bytes per element) and slightly better at int8, where both are near-lossless (12.908 and 12.917); at fp8
per-token groups are better (12.99 against 13.08). Per-token groups are what is implemented: no residual, no
re-quantization, one write per step; docs/kv_quant.md says what per-channel keys would cost. The default group is 32
channels: at 64, int4 loses 2.7x more perplexity (14.84), while 16 gains little for 20% more bytes (13.49).

Layout of a `QuantizedKV` holding ``N`` tokens of ``H`` heads (``G = D // group_size`` groups per token):

- ``data``: int8 ``[B, H, N, D]`` uint8 codes 0..255; int4 ``[B, H, N, D // 2]`` uint8, channel ``2j`` in the low
  nibble of byte ``j`` and ``2j + 1`` in the high nibble; fp8 ``[B, H, N, D]`` ``torch.float8_e4m3fn``.
- ``scale``: ``[B, H, N, G]`` float16. ``zero``: int8/int4 ``[B, H, N, G]`` float16, the value code 0 stands for
  (``x ~ code * scale + zero``); fp8 is symmetric (``x ~ code * scale``) and has no zero.

Scales and zeros are float16 whatever the model dtype: as many bytes as bf16 but three more mantissa bits (the rounding
of a stored scale widens the error bound less), the byte count does not depend on the model, and K/V activations lie
far inside float16's range (|x| < 65504 is required: larger values do not survive as a float16 zero or scale).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

KV_QUANT_KINDS = ("int8", "int4", "fp8")
DEFAULT_GROUP_SIZE = 32  # channels per scale, from the measurement in docs/kv_quant.md
LEVELS = {"int8": 255, "int4": 15}  # largest code of the integer kinds
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # Triton converts float8 e4m3 only on Ada/Hopper and newer
PARAM_DTYPE = torch.float16
_NAME = re.compile(r"(?P<kind>[a-z0-9]+)(?:-g(?P<group>\d+))?")


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@dataclass(frozen=True)
class KVQuantSpec:
    """What to quantize K/V to: ``kind`` in `KV_QUANT_KINDS`, one scale (and zero) per ``group_size`` channels."""

    kind: str
    group_size: int

    def __post_init__(self) -> None:
        if self.kind not in KV_QUANT_KINDS:
            raise ValueError(f"unknown KV quantization {self.kind!r}; choose one of {', '.join(KV_QUANT_KINDS)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    @classmethod
    def from_name(
        cls, name: str | None, head_dim: int | None = None, device: torch.device | str | None = None
    ) -> KVQuantSpec | None:
        """Parse ``"int8"``, ``"int4"``, ``"fp8"``, optionally with a group size (``"int4-g64"``); ``None`` means no
        quantization. Without a group size, `DEFAULT_GROUP_SIZE` is used (its gcd with ``head_dim`` when that is
        given, so small heads still work). Checks that ``head_dim`` and ``device``, where given, are supported
        (`check`)."""
        if name is None:
            return None
        match = _NAME.fullmatch(name)
        if match is None or match["kind"] not in KV_QUANT_KINDS:
            raise ValueError(
                f"unknown KV quantization {name!r}; choose one of {', '.join(KV_QUANT_KINDS)}, "
                "optionally with a group size such as 'int4-g32'"
            )
        kind = match["kind"]
        if match["group"] is not None:
            group = int(match["group"])
        else:
            group = DEFAULT_GROUP_SIZE if head_dim is None else math.gcd(DEFAULT_GROUP_SIZE, head_dim)
        spec = cls(kind, group)
        spec.check(head_dim, device)
        return spec

    def check(self, head_dim: int | None, device: torch.device | str | None = None) -> None:
        """Raise ``ValueError`` unless heads of ``head_dim`` channels can be quantized (and, on CUDA, attended by the
        Triton kernel) on ``device``; ``None`` skips that part."""
        if head_dim is not None and self.kind == "int4" and head_dim % 2:
            raise ValueError(f"int4 packs two channels per byte, so head_dim must be even; got {head_dim}")
        if head_dim is not None and head_dim % self.group_size:
            raise ValueError(
                f"head_dim {head_dim} is not a multiple of the quantization group size {self.group_size}; "
                f"use a group that divides it, e.g. '{self.kind}-g{math.gcd(head_dim, self.group_size)}'"
            )
        device = torch.device(device) if device is not None else None
        if self.kind == "fp8" and device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            capability = _cuda_capability(index)
            if capability < FP8_MIN_CAPABILITY:
                raise ValueError(
                    f"an fp8 (e4m3) KV cache needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer) for the "
                    f"Triton decode kernel; {device} has {capability[0]}.{capability[1]}: use int8 instead"
                )

    def data_shape(self, head_dim: int) -> tuple[int, int]:
        """``(bytes or fp8 elements per token and head, groups per token and head)``."""
        return (head_dim // 2 if self.kind == "int4" else head_dim), head_dim // self.group_size

    @property
    def name(self) -> str:
        """The full name, group included (``"int4-g32"``): `from_name` parses it back to this spec."""
        return f"{self.kind}-g{self.group_size}"

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kind == "fp8" else torch.uint8

    @property
    def has_zero(self) -> bool:
        return self.kind != "fp8"


def resolve_kv_quant(
    kv_quant: str | KVQuantSpec | None, head_dim: int | None = None, device: torch.device | str | None = None
) -> KVQuantSpec | None:
    """The spec a ``kv_quant`` argument stands for: ``None`` (no quantization), a name (`KVQuantSpec.from_name`,
    whose default group is fitted to ``head_dim``) or a spec, checked against ``head_dim`` and ``device`` where
    given. One function, so the patch, the cache and the pre-hook's comparison read a name alike."""
    if isinstance(kv_quant, KVQuantSpec):
        kv_quant.check(head_dim, device)
        return kv_quant
    if kv_quant is not None and not isinstance(kv_quant, str):
        raise ValueError(
            f"kv_quant must be None, a name ({', '.join(KV_QUANT_KINDS)}, optionally with a group such as "
            f"'int4-g32') or a KVQuantSpec; got {kv_quant!r}"
        )
    return KVQuantSpec.from_name(kv_quant, head_dim, device)


@dataclass(frozen=True)
class QuantizedKV:
    """Quantized keys or values of ``N`` tokens: ``data [B, H, N, *]``, ``scale``/``zero [B, H, N, G]`` (the
    module docstring has the layout). Buffers are written in place by `quantize_into`."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    @classmethod
    def empty(
        cls, spec: KVQuantSpec, batch: int, num_heads: int, capacity: int, head_dim: int, device: torch.device | str
    ) -> QuantizedKV:
        """Buffers for ``capacity`` tokens, uninitialised: readers look only at written (valid) tokens."""
        spec.check(head_dim, device)
        width, groups = spec.data_shape(head_dim)
        data = torch.empty(batch, num_heads, capacity, width, dtype=spec.data_dtype, device=device)
        scale = torch.empty(batch, num_heads, capacity, groups, dtype=PARAM_DTYPE, device=device)
        return cls(data, scale, torch.empty_like(scale) if spec.has_zero else None)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.data, self.scale) if self.zero is None else (self.data, self.scale, self.zero)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedKV:
        """The same transform (a token slice, a batch ``index_select``, ...) applied to every tensor."""
        return QuantizedKV(fn(self.data), fn(self.scale), None if self.zero is None else fn(self.zero))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _float16_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32, >= 0) rounded up to a float16 of at least 2**-24, so a zero range still divides."""
    up = x.to(PARAM_DTYPE)
    up = torch.where(up.float() < x, torch.nextafter(up, torch.full_like(up, math.inf)), up)
    return up.clamp_min(2**-24)


def _float16_at_most(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded down to a float16."""
    down = x.to(PARAM_DTYPE)
    return torch.where(down.float() > x, torch.nextafter(down, torch.full_like(down, -math.inf)), down)


def quantize(x: torch.Tensor, spec: KVQuantSpec) -> QuantizedKV:
    """Quantize ``x [B, H, N, D]`` (keys or values; any float dtype, arithmetic in fp32) group by group.

    int8 / int4 (asymmetric): ``zero`` = the group minimum rounded down to float16, ``scale`` = (group maximum -
    ``zero``) / L rounded up to float16 (L = 255 / 15), ``code = round((x - zero) / scale)`` lies in 0..L. Bound:
    ``|x - dequantize(quantize(x))| <= scale / 2`` per element, with the element's stored group scale.
    fp8 (e4m3, symmetric): ``scale`` = group max |x| / 448 rounded up to float16, ``code = fp8(x / scale)``
    (round to nearest, never saturating). Bound: ``|x - dequantize(quantize(x))| <= max(|x| / 16, scale / 1024)``
    (3 mantissa bits: half a step is at most 2**-4 of a normal value; subnormal steps are 2**-9 * scale).
    Both bounds hold up to fp32 rounding of the arithmetic: 2**-22 times |x| + |zero| + scale at most.
    Device ops only, no host synchronisation: a CUDA-graph decode step can quantize its token.
    """
    spec.check(x.shape[-1])
    groups = x.float().unflatten(-1, (-1, spec.group_size))
    if spec.kind == "fp8":
        scale = _float16_at_least(groups.abs().amax(-1) / FP8_MAX)
        codes = (groups / scale.float()[..., None]).to(torch.float8_e4m3fn).flatten(-2)
        return QuantizedKV(codes, scale, None)
    zero = _float16_at_most(groups.amin(-1))
    scale = _float16_at_least((groups.amax(-1) - zero.float()) / LEVELS[spec.kind])
    # in 0..L without clamping: x >= zero, and (max - zero) / scale <= L up to fp32 rounding far below 1/2
    codes = ((groups - zero.float()[..., None]) / scale.float()[..., None]).round().to(torch.uint8).flatten(-2)
    if spec.kind == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedKV(codes, scale, zero)


def dequantize(q: QuantizedKV, spec: KVQuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[B, H, N, D]`` values ``q`` stands for, computed in fp32 (fp64 if asked for) and returned as ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    codes = q.data
    if spec.kind == "int4":
        codes = torch.stack((codes & 15, codes >> 4), -1).flatten(-2)
    values = codes.to(work).unflatten(-1, (-1, spec.group_size)) * q.scale.to(work)[..., None]
    if q.zero is not None:
        values = values + q.zero.to(work)[..., None]
    return values.flatten(-2).to(dtype)


def _check_into(x: torch.Tensor, spec: KVQuantSpec, buffers: QuantizedKV, index: int | torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected x of shape [B, H, N, D], got {tuple(x.shape)}")
    batch, heads, num_new, head_dim = x.shape
    spec.check(head_dim)
    width, groups = spec.data_shape(head_dim)
    capacity = buffers.data.shape[2]
    expected = {
        "data": ((batch, heads, capacity, width), spec.data_dtype),
        "scale": ((batch, heads, capacity, groups), PARAM_DTYPE),
    }
    if spec.has_zero:
        expected["zero"] = expected["scale"]
    if (buffers.zero is not None) != spec.has_zero:
        raise ValueError(f"{spec.kind} buffers {'need a zero tensor' if spec.has_zero else 'take no zero tensor'}")
    for name, (shape, dtype) in expected.items():
        tensor = getattr(buffers, name)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != x.device:
            raise ValueError(
                f"{name} buffer is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; tokens of "
                f"{tuple(x.shape)} on {x.device} as {spec.kind}-g{spec.group_size} need {shape} {dtype}"
            )
    if isinstance(index, torch.Tensor):
        if index.shape != (num_new,) or index.dtype != torch.long or index.device != x.device:
            raise ValueError(
                f"index must be a long tensor of the {num_new} token slots on {x.device}, got {tuple(index.shape)} "
                f"{index.dtype} on {index.device}"
            )
    elif not 0 <= index <= capacity - num_new:
        raise ValueError(f"{num_new} tokens at index {index} do not fit buffers of {capacity} tokens")


def quantize_into(x: torch.Tensor, spec: KVQuantSpec, buffers: QuantizedKV, index: int | torch.Tensor) -> None:
    """Quantize the ``N`` tokens ``x [B, H, N, D]`` and write them into ``buffers`` along the token dim: an ``int``
    is the first of ``N`` consecutive slots (a chunk appended); a long tensor ``[N]`` holds each token's slot on the
    device (``index_copy_``: a static or CUDA-graph decode step's write index, ring slots; not range-checked, which
    would need a host sync). Only the new tokens are ever in full precision. Invalid arguments raise ``ValueError``
    before anything is written."""
    _check_into(x, spec, buffers, index)
    new = quantize(x, spec)
    for buffer, part in zip(buffers.tensors(), new.tensors()):
        if buffer.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernel: copy the bytes
            buffer, part = buffer.view(torch.uint8), part.view(torch.uint8)
        if isinstance(index, torch.Tensor):
            buffer.index_copy_(2, index, part)
        else:
            buffer[:, :, index : index + x.shape[2]] = part


def bytes_per_token(spec: KVQuantSpec, num_heads: int, head_dim: int) -> int:
    """Bytes one token takes in ONE quantized tensor (its keys or its values) of ``num_heads`` heads, codes plus
    float16 scales and zeros; a K/V pair takes twice this."""
    spec.check(head_dim)
    width, groups = spec.data_shape(head_dim)
    params = groups * PARAM_DTYPE.itemsize * (2 if spec.has_zero else 1)
    return num_heads * (width * spec.data_dtype.itemsize + params)
