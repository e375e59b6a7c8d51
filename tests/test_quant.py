"""KV quantization: the stated error bounds, int4 packing, in-place writes, byte accounting, input checks, the
quantized split-KV decode kernel (Triton's interpreter without a GPU) against float64 attention, and the custom op
a compiled decode step calls."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_attn import kv_quant
from duo_attn.kernels import quant_decode
from duo_attn.kernels.quant_decode import quant_decode_attention, reference_quant_decode_attention
from duo_attn.kv_quant import (
    KV_QUANT_KINDS,
    KVQuantSpec,
    QuantizedKV,
    bytes_per_token,
    dequantize,
    quantize,
    quantize_into,
)

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_SLACK = 2**-22  # relative fp32 rounding of the quantizer's arithmetic, which the stated bounds leave out


def _groups(x: torch.Tensor, spec: KVQuantSpec) -> torch.Tensor:
    return x.double().unflatten(-1, (-1, spec.group_size))


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(KV_QUANT_KINDS),
    group=st.sampled_from([2, 8, 32]),
    groups_per_token=st.integers(1, 3),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9)),
    magnitude=st.floats(1e-4, 300),  # with the outlier token, |x| stays within float16's range
    offset=st.floats(-50, 50),
    constant_token=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_within_the_stated_bound(
    kind, group, groups_per_token, shape, magnitude, offset, constant_token, dtype, seed
):
    spec = KVQuantSpec(kind, group)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, group * groups_per_token, generator=gen) * magnitude + offset
    x[..., 0, :] *= 30  # an outlier token (an attention sink's keys are much larger)
    if constant_token:
        x[..., -1, :] = offset
    x = x.to(dtype)
    q = quantize(x, spec)
    error = _groups(x - dequantize(q, spec), spec).abs()
    values = _groups(x, spec)
    scale = q.scale.double()[..., None]
    if kind == "fp8":
        slack = FP32_SLACK * (values.abs() + scale)
        amax = values.abs().amax(-1, keepdim=True)
        assert (scale >= amax / 448).all() and (scale <= amax / 448 * (1 + 2**-10) + 2**-24).all()
        assert (error <= torch.maximum(values.abs() / 16, scale / 1024) + slack).all()
        assert q.zero is None
    else:
        levels = kv_quant.LEVELS[kind]
        low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
        zero = q.zero.double()[..., None]
        slack = FP32_SLACK * (values.abs() + zero.abs() + scale)
        # the stored zero and scale are the group's range, rounded outwards to float16 by at most one step
        assert (zero <= low).all() and (zero >= low - low.abs() * 2**-10 - 2**-24).all()
        assert (scale >= (high - zero) / levels * (1 - 2**-22)).all()  # the range is divided in fp32 first
        assert (scale <= (high - zero) / levels * (1 + 2**-10) + 2**-24).all()
        assert (error <= scale / 2 + slack).all()


@pytest.mark.parametrize("kind,levels", [("int8", 255), ("int4", 15)])
def test_codes_and_int4_nibbles_are_exact(kind, levels):
    """A group holding 0..L has zero 0 and scale 1, so the codes are the values, packed as documented."""
    spec = KVQuantSpec(kind, 16)
    codes = torch.randint(0, levels + 1, (2, 3, 5, 32), generator=torch.Generator().manual_seed(0))
    codes[..., ::16], codes[..., 1::16] = 0, levels
    q = quantize(codes.float(), spec)
    assert torch.equal(q.scale, torch.ones_like(q.scale)) and torch.equal(q.zero, torch.zeros_like(q.zero))
    expected = codes if kind == "int8" else codes[..., 0::2] | (codes[..., 1::2] << 4)
    assert q.data.dtype == torch.uint8 and torch.equal(q.data, expected.to(torch.uint8))
    assert torch.equal(dequantize(q, spec), codes.float())


@pytest.mark.parametrize("kind", KV_QUANT_KINDS)
def test_quantize_into_at_indices_equals_quantizing_everything(kind):
    spec = KVQuantSpec(kind, 16)
    x = torch.randn(2, 3, 40, 32, generator=torch.Generator().manual_seed(1))
    buffers = QuantizedKV.empty(spec, 2, 3, 64, 32, "cpu")
    quantize_into(x[:, :, :17], spec, buffers, 0)  # pre-fill chunks
    quantize_into(x[:, :, 17:30], spec, buffers, 17)
    for t in range(30, 35):  # decode steps at a device-side index
        quantize_into(x[:, :, t : t + 1], spec, buffers, torch.tensor([t]))
    slots = torch.tensor([39, 36, 38, 35, 37])  # ring-style scattered slots
    quantize_into(x[:, :, slots], spec, buffers, slots)
    whole = quantize(x, spec)
    for written, expected in zip(buffers.map(lambda t: t[:, :, :40]).tensors(), whole.tensors()):
        assert written.dtype == expected.dtype and torch.equal(written.view(torch.uint8), expected.view(torch.uint8))


def test_bytes_per_token_counts_codes_scales_and_zeros():
    assert bytes_per_token(KVQuantSpec("int8", 64), 1, 64) == 64 + 2 + 2
    assert bytes_per_token(KVQuantSpec("int4", 32), 1, 128) == 64 + 4 * (2 + 2)
    assert bytes_per_token(KVQuantSpec("fp8", 64), 3, 128) == 3 * (128 + 2 * 2)
    for kind in KV_QUANT_KINDS:
        spec = KVQuantSpec(kind, 16)
        one_token = quantize(torch.randn(1, 5, 1, 96), spec)
        assert bytes_per_token(spec, 5, 96) == one_token.nbytes
        assert QuantizedKV.empty(spec, 2, 5, 7, 96, "cpu").nbytes == 2 * 7 * bytes_per_token(spec, 5, 96)


def test_names_and_defaults():
    assert KVQuantSpec.from_name(None) is None
    assert KVQuantSpec.from_name("int4-g64", head_dim=128) == KVQuantSpec("int4", 64)
    for kind in KV_QUANT_KINDS:
        assert KVQuantSpec.from_name(kind) == KVQuantSpec(kind, kv_quant.DEFAULT_GROUP_SIZE)
        assert KVQuantSpec.from_name(kind, head_dim=16).group_size == 16  # small heads: the default's gcd
    assert KVQuantSpec.from_name("fp8", head_dim=64, device="cpu").kind == "fp8"  # CPU: the reference path


def test_bad_specs_raise_clear_errors(monkeypatch):
    for name in ("int3", "INT8", "int8-g", "fp16", "int8-32"):
        with pytest.raises(ValueError, match="choose one of int8, int4, fp8"):
            KVQuantSpec.from_name(name)
    with pytest.raises(ValueError, match="positive integer"):
        KVQuantSpec("int8", 0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        KVQuantSpec.from_name("int4-g3", head_dim=63)
    with pytest.raises(ValueError, match="not a multiple of the quantization group size 48.*int8-g16"):
        KVQuantSpec.from_name("int8-g48", head_dim=64)
    monkeypatch.setattr(kv_quant, "_cuda_capability", lambda index: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*cuda:0 has 8.0"):
        KVQuantSpec.from_name("fp8", head_dim=64, device="cuda:0")
    KVQuantSpec.from_name("int8", head_dim=64, device="cuda:0")  # integer kinds run on any GPU
    monkeypatch.setattr(kv_quant, "_cuda_capability", lambda index: (9, 0))
    KVQuantSpec.from_name("fp8", head_dim=64, device="cuda:0")


def test_bad_writes_raise_and_change_nothing():
    spec = KVQuantSpec("int4", 16)
    buffers = QuantizedKV.empty(spec, 2, 3, 8, 32, "cpu")
    for t in buffers.tensors():
        t.zero_()
    x = torch.randn(2, 3, 4, 32)
    bad = [
        (x, spec, buffers, 5, "do not fit"),
        (x, spec, buffers, -1, "do not fit"),
        (x, spec, buffers, torch.arange(3), "index must be a long tensor of the 4"),
        (x, spec, buffers, torch.arange(4, dtype=torch.int32), "index must be a long tensor"),
        (x[:1], spec, buffers, 0, r"data buffer is \(2, 3, 8, 16\)"),
        (x[..., :16], spec, buffers, 0, "data buffer"),
        (x, KVQuantSpec("int8", 16), buffers, 0, "data buffer"),
        (x, KVQuantSpec("int4", 8), buffers, 0, "scale buffer"),
        (x, KVQuantSpec("fp8", 16), buffers, 0, "fp8 buffers take no zero tensor"),
        (x[0], spec, buffers, 0, r"shape \[B, H, N, D\]"),
        (x[..., :31], spec, buffers, 0, "even"),
    ]
    for args in bad:
        with pytest.raises(ValueError, match=args[-1]):
            quantize_into(*args[:-1])
        assert all(not t.any() for t in buffers.tensors())


def _dense_float64(query, key, value, spec, valid, scale):
    groups = query.shape[1] // key.data.shape[1]
    k = dequantize(key, spec, torch.float64).repeat_interleave(groups, 1)
    v = dequantize(value, spec, torch.float64).repeat_interleave(groups, 1)
    scores = (query.double() @ k.transpose(-1, -2) * scale).masked_fill(~valid[:, None, None], -math.inf)
    return scores.softmax(-1) @ v.masked_fill(~valid[:, None, :, None], 0)


needs_triton = pytest.mark.skipif(quant_decode.triton_quant_decode_attention is None, reason="Triton is not installed")
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 and the packed int4 conversion (PTX) need a GPU")


@needs_triton
@pytest.mark.parametrize(
    "kind,group,batch,kv_heads,groups,capacity,head_dim,length,padded,dtype",
    [
        ("int8", 32, 2, 3, 1, 300, 64, 257, False, torch.float32),  # several splits, a partial last block
        ("int8", 8, 1, 1, 7, 40, 16, 1, True, torch.float32),  # GQA 7, one valid key
        ("int4", 32, 2, 1, 7, 200, 96, 150, True, torch.float32),  # head_dim not a power of two, padding
        ("int4", 64, 1, 2, 1, 130, 64, 130, False, torch.float32),  # the whole buffer
        ("fp8", 16, 1, 2, 7, 130, 32, 99, True, torch.float32),
        ("fp8", 64, 2, 1, 1, 100, 64, 64, False, torch.float32),
        ("int4", 32, 1, 2, 7, 100, 64, 70, True, torch.float16),  # half queries: tensor-core dots
        ("int8", 12, 1, 1, 2, 50, 48, 40, True, torch.float32),  # a group that is no power of two: per-channel loads
        ("int4", 32, 1, 2, 4, 300, 128, 290, True, torch.float32),  # the Llama-3-8B head: 4 groups x GQA 4 rows
        ("int8", 32, 1, 3, 1, 100, 128, 77, False, torch.float32),  # MHA: rows padded to 16 by query heads
        ("int4", 32, 1, 1, 4, 256, 128, 200, False, torch.float16),  # (the interpreter has no bfloat16)
        ("int4", 16, 1, 1, 2, 40, 16, 33, True, torch.float32),  # 8 code bytes per token: too few to fold
        ("int8", 32, 2, 2, 4, 200, 128, 131, True, torch.float16),  # half queries over int8 codes
        ("int8", 16, 1, 1, 7, 70, 64, 70, False, torch.float16),
        pytest.param("int4", 32, 1, 2, 4, 300, 128, 290, True, torch.bfloat16, marks=on_gpu),  # the packed path
        pytest.param("int4", 32, 2, 1, 4, 64, 128, 64, False, torch.bfloat16, marks=on_gpu),  # full blocks only
    ],
)
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "dequantizing"])
def test_quant_decode_kernel_matches_float64_attention(
    kind, group, batch, kv_heads, groups, capacity, head_dim, length, padded, dtype, folded, monkeypatch
):
    """Both kernels (`_folded_split_kernel` where the group allows, else `_quant_split_kernel`; ``folded=False``
    forces the second) against float64 attention over the dequantized keys and values."""
    from duo_attn.kernels import triton_quant_decode

    monkeypatch.setitem(triton_quant_decode.LAUNCH, "folded", folded)
    spec = KVQuantSpec(kind, group)
    gen = torch.Generator().manual_seed(capacity + length)
    query = torch.randn(batch, kv_heads * groups, 1, head_dim, generator=gen).to(DEVICE, dtype)
    key, value = (QuantizedKV.empty(spec, batch, kv_heads, capacity, head_dim, DEVICE) for _ in range(2))
    for buffers in (key, value):
        quantize_into(torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(DEVICE) * 3, spec, buffers, 0)
        buffers.scale[:, :, length:] = math.nan  # never written, never read
    key_pos = None
    valid = (torch.arange(capacity, device=DEVICE) < length).expand(batch, -1)
    if padded:
        key_pos = torch.arange(capacity, device=DEVICE).repeat(batch, 1)
        key_pos[0, : min(17, length - 1)] = -1
        key_pos[-1, 5:9] = -1
        valid = valid & (key_pos >= 0)
    length_t = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    expected = _dense_float64(query, key, value, spec, valid, scale)
    wide = torch.full((batch, kv_heads * groups + 2, 1, head_dim), math.nan, dtype=dtype, device=DEVICE)
    out = quant_decode.triton_quant_decode_attention(query, key, value, spec, length_t, key_pos, scale, wide[:, 1:-1])
    assert out.data_ptr() == wide[:, 1:-1].data_ptr() and wide[:, [0, -1]].isnan().all()  # wrote into the view
    # half queries: p is rounded to half for the value dot, and values of magnitude ~9 (3x randn) amplify that
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=2e-3),
           torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2)}[dtype]  # bf16: 8 bits where fp16 has 11
    torch.testing.assert_close(out.double(), expected, **tol)
    reference = reference_quant_decode_attention(query, key, value, spec, length_t, key_pos, scale)
    torch.testing.assert_close(reference.double(), expected, **tol)
    dispatched = quant_decode_attention(query, key, value, spec, length_t, key_pos, None)
    torch.testing.assert_close(dispatched.double(), expected, **tol)


@needs_triton
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1000, 1024 + 17])
def test_packed_nibble_conversion_equals_the_arithmetic_one(dtype, length, monkeypatch):
    """The packed bit-operation conversion of int4 codes is exact, so the kernel's output is bitwise the same as
    with the arithmetic conversion (same dots, same order)."""
    from duo_attn.kernels import triton_quant_decode

    spec = KVQuantSpec("int4", 32)
    gen = torch.Generator().manual_seed(length)
    query = torch.randn(1, 16, 1, 128, generator=gen).to(DEVICE, dtype)
    key, value = (quantize(torch.randn(1, 4, length, 128, generator=gen).to(DEVICE), spec) for _ in range(2))
    length_t = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    outs = []
    for packed in (True, False):
        monkeypatch.setitem(triton_quant_decode.LAUNCH, "packed", packed)
        outs.append(quant_decode.triton_quant_decode_attention(query, key, value, spec, length_t, None, 128**-0.5))
    assert torch.equal(outs[0], outs[1])


def _op_args(query, key, value, spec, length, key_pos, scale, out):
    return (query, key.data.view(torch.uint8), key.scale, key.zero, value.data.view(torch.uint8), value.scale,
            value.zero, length, key_pos, scale, spec.kind, spec.group_size, out)  # fmt: skip


@pytest.mark.parametrize("kind", KV_QUANT_KINDS)
def test_the_custom_op_passes_opcheck(kind):
    """Schema, fake tensor and AOT-dispatch checks: what torch.compile relies on to trace through the op."""
    spec = KVQuantSpec(kind, 16)
    gen = torch.Generator().manual_seed(2)
    key, value = (quantize(torch.randn(2, 2, 24, 32, generator=gen), spec) for _ in range(2))
    query = torch.randn(2, 4, 1, 32, generator=gen)
    key_pos = torch.arange(24).repeat(2, 1)
    key_pos[0, :3] = -1
    length = torch.tensor([20], dtype=torch.int32)
    for pos in (None, key_pos):
        args = _op_args(query, key, value, spec, length, pos, 0.25, torch.empty_like(query))
        torch.library.opcheck(torch.ops.duo_attn.quant_decode_attention.default, args)


def test_a_compiled_function_calls_the_op_in_one_graph():
    """fullgraph: no graph break around the call; the write into a view of the caller's output survives
    functionalisation."""
    spec = KVQuantSpec("int4", 16)
    gen = torch.Generator().manual_seed(3)
    key, value = (quantize(torch.randn(1, 2, 40, 32, generator=gen), spec) for _ in range(2))
    query = torch.randn(1, 6, 1, 32, generator=gen)
    length = torch.tensor([33], dtype=torch.int32)

    def step(query: torch.Tensor, length: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        return quant_decode_attention(query * 2, key, value, spec, length, None, None, out=wide[:, 1:-1])

    wide = torch.full((1, 8, 1, 32), math.nan)
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(query, length, wide)
    expected = reference_quant_decode_attention(query * 2, key, value, spec, length, None, 32**-0.5)
    assert torch.equal(wide[:, 1:-1], expected) and wide[:, [0, -1]].isnan().all()
