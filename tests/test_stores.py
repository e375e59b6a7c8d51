"""The retrieval heads' stores: dense and quantized behave alike through one interface (chunks and device-index
writes, reads, growth, zeroing, batch maps, byte counts), a static decode step over either matches float64 attention
and compiles into one graph, and bad inputs raise before anything changes."""

import math

import pytest
import torch

from duo_attn import kv_quant
from duo_attn.kernels.quant_decode import store_decode_attention
from duo_attn.kv_quant import KVQuantSpec, bytes_per_token, dequantize, quantize
from duo_attn.stores import DenseStore, QuantizedStore, make_store

pytestmark = pytest.mark.usefixtures("one_thread")
B, H, D, CAPACITY = 2, 2, 32, 24
SPECS = [None, KVQuantSpec("int8", 16), KVQuantSpec("int4", 16), KVQuantSpec("fp8", 16)]
IDS = ["dense", "int8", "int4", "fp8"]
FP32_SLACK = 2**-22  # as in test_quant.py: fp32 rounding the stated bounds leave out


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(seed)) * 3


def _store(spec, capacity=CAPACITY):
    return make_store(spec, B, H, capacity, D, torch.float32, "cpu")


def _snapshot(store) -> list[torch.Tensor]:
    return [t.view(torch.uint8).clone() for t in store.tensors()]


def _same(store, snapshot) -> bool:
    return all(torch.equal(t.view(torch.uint8), s) for t, s in zip(store.tensors(), snapshot))


def _assert_within_stated_bound(x: torch.Tensor, read: torch.Tensor, spec: KVQuantSpec) -> None:
    """kv_quant.quantize's bounds: ``scale / 2`` for the integer kinds, ``max(|x| / 16, scale / 1024)`` for fp8."""
    scale = quantize(x, spec).scale.double().repeat_interleave(spec.group_size, -1)
    error = (x.double() - read.double()).abs()
    bound = torch.maximum(x.double().abs() / 16, scale / 1024) if spec.kind == "fp8" else scale / 2
    assert (error <= bound + FP32_SLACK * (x.double().abs() + scale + 1)).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_chunks_read_back_exactly_dense_and_within_the_bound_quantized(spec):
    store, x = _store(spec), _tokens(13, 0)
    store.write(x[:, :, :5], x[:, :, :5], 0)
    store.write(x[:, :, 5:], x[:, :, 5:] * 2, 5)
    keys, values = store.read(13, torch.float32)
    assert keys.shape == values.shape == (B, H, 13, D) and keys.dtype == torch.float32
    expected_v = torch.cat([x[:, :, :5], x[:, :, 5:] * 2], 2)
    if spec is None:
        assert torch.equal(keys, x) and torch.equal(values, expected_v)
        assert keys.data_ptr() == store.keys.data_ptr()  # a view, no copy
    else:
        # per-token groups: a chunk's codes are the codes of quantizing everything at once
        assert torch.equal(keys, dequantize(quantize(x, spec), spec))
        _assert_within_stated_bound(x, keys, spec)
        _assert_within_stated_bound(expected_v, values, spec)
    assert store.read(13, torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_write_at_a_device_index_equals_write_at_that_int(spec):
    by_int, by_index, x = _store(spec), _store(spec), _tokens(CAPACITY, 1)
    for store in (by_int, by_index):
        store.zero_from(0)
    for t in (0, 7, 3):
        by_int.write(x[:, :, t : t + 1], x[:, :, t : t + 1] + 1, t)
        by_index.write_at(x[:, :, t : t + 1], x[:, :, t : t + 1] + 1, torch.tensor([t]))
    slots = torch.tensor([20, 11, 23])  # several scattered tokens at once
    by_index.write_at(x[:, :, slots], x[:, :, slots] + 1, slots)
    for t in slots.tolist():
        by_int.write(x[:, :, t : t + 1], x[:, :, t : t + 1] + 1, t)
    assert _same(by_index, _snapshot(by_int))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_grow_keeps_the_used_tokens_and_leaves_the_old_store(spec):
    store, x = _store(spec), _tokens(13, 2)
    store.write(x, -x, 0)
    before = _snapshot(store)
    grown = store.grow(40, 13)
    assert type(grown) is type(store) and grown.capacity == 40 and store.capacity == CAPACITY
    assert all(torch.equal(a, b) for a, b in zip(grown.read(13, torch.float32), store.read(13, torch.float32)))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(grown.tensors(), store.tensors()))
    assert _same(store, before)
    for capacity, used in ((40, 30), (10, 13), (40, -1)):
        with pytest.raises(ValueError, match="cannot keep"):
            store.grow(capacity, used)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_zero_from_makes_unwritten_slots_read_as_zero(spec):
    store, x = _store(spec), _tokens(13, 3)
    for t in store.tensors():  # garbage, as uninitialised memory may hold
        t.view(torch.uint8).fill_(0xFF)
    store.write(x, x, 0)
    written = store.read(13, torch.float32)
    store.zero_from(13)
    keys, values = store.read(CAPACITY, torch.float32)
    assert not keys[:, :, 13:].any() and not values[:, :, 13:].any()
    assert torch.equal(keys[:, :, :13], written[0]) and torch.equal(values[:, :, :13], written[1])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_maps_new_and_in_place(spec):
    store, x = _store(spec), _tokens(CAPACITY, 4)
    store.write(x, x + 1, 0)
    before = _snapshot(store)
    flip = torch.tensor([1, 0])
    keys, values = (t.clone() for t in store.read(CAPACITY, torch.float32))  # a dense read is a view

    mapped = store.map_batch(lambda t: t.index_select(0, flip))
    assert type(mapped) is type(store) and _same(store, before)
    assert torch.equal(mapped.read(CAPACITY, torch.float32)[0], keys[flip])
    assert store.map_batch(lambda t: t.repeat_interleave(3, dim=0)).batch == 3 * B

    addresses = [t.data_ptr() for t in store.tensors()]
    with pytest.raises(ValueError, match="fn must keep their shapes"):
        store.copy_batch_(lambda t: t[:1])
    assert _same(store, before)
    store.copy_batch_(lambda t: t.index_select(0, flip))
    assert [t.data_ptr() for t in store.tensors()] == addresses
    after = store.read(CAPACITY, torch.float32)
    assert torch.equal(after[0], keys[flip]) and torch.equal(after[1], values[flip])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_nbytes_counts_codes_scales_and_zeros(spec):
    store = _store(spec)
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in store.tensors())
    per_token = B * H * D * 4 if spec is None else B * bytes_per_token(spec, H, D)
    assert store.nbytes(7) == 2 * 7 * per_token and store.nbytes(0) == 0
    with pytest.raises(ValueError, match="holds no 25 tokens"):
        store.nbytes(CAPACITY + 1)


def _float64_attention(query, keys, values, valid, scale):
    groups = query.shape[1] // keys.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (keys, values))
    scores = (query.double() @ k.transpose(-1, -2) * scale).masked_fill(~valid[:, None, None], -math.inf)
    return scores.softmax(-1) @ v.masked_fill(~valid[:, None, :, None], 0)


def _filled(spec, x):
    store = _store(spec)
    store.write(x[:, :, :17], x[:, :, 17:34], 0)
    store.zero_from(17)
    return store


def test_decode_over_each_store_matches_float64_attention_of_what_it_holds():
    gen = torch.Generator().manual_seed(5)
    x, query = torch.randn(B, H, 34, D, generator=gen), torch.randn(B, 3 * H, 1, D, generator=gen)
    length = torch.tensor([17], dtype=torch.int32)
    key_pos = torch.arange(CAPACITY).repeat(B, 1)
    key_pos[1, :4] = -1  # left padding
    valid = (torch.arange(CAPACITY) < 17) & (key_pos >= 0)
    outputs = {}
    for spec, name in zip(SPECS, IDS):
        store = _filled(spec, x)
        wide = torch.full((B, 3 * H + 1, 1, D), math.nan)
        out = store_decode_attention(store, query, length, key_pos, None, out=wide[:, 1:])
        assert out.data_ptr() == wide[:, 1:].data_ptr() and wide[:, 0].isnan().all()
        expected = _float64_attention(query, *store.read(CAPACITY, torch.float32), valid, D**-0.5)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        outputs[name] = out
    # and the quantized outputs stay near the dense one (int8 closest)
    errors = {name: float((outputs[name] - outputs["dense"]).norm() / outputs["dense"].norm()) for name in IDS[1:]}
    assert errors["int8"] < 0.02 and errors["int8"] < errors["fp8"] < errors["int4"] < 0.3


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=["dense", "fp8"])
def test_a_compiled_static_step_is_one_graph_reused_at_every_index(spec):
    """Write at a device index, then attend: one graph (fullgraph), compiled once for all steps; buffers keep their
    addresses and the result equals the eager step's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    gen = torch.Generator().manual_seed(6)
    x, query = torch.randn(B, H, 34, D, generator=gen), torch.randn(B, 2 * H, 1, D, generator=gen)

    def step(store, key, value, index, length, query, out):
        store.mark_static()  # a no-op inside the graph
        store.write_at(key, value, index)
        return store_decode_attention(store, query, length, None, None, out=out)

    eager, compiled_store = _filled(spec, x), _filled(spec, x)
    compiled_store.mark_static()
    addresses = [t.data_ptr() for t in compiled_store.tensors()]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    index, length = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.int32)
    for t in (17, 18, 19):
        index.fill_(t)
        length.fill_(t + 1)
        token = x[:, :, t : t + 1]
        expected = step(eager, token, -token, index, length, query, torch.empty_like(query))
        got = compiled(compiled_store, token, -token, index, length, query, torch.empty_like(query))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1
    assert [t.data_ptr() for t in compiled_store.tensors()] == addresses and _same(compiled_store, _snapshot(eager))


def test_bad_specs_raise_before_allocating(monkeypatch):
    with pytest.raises(ValueError, match="unknown KV quantization 'int3'"):
        KVQuantSpec.from_name("int3", head_dim=D)
    with pytest.raises(ValueError, match="head_dim must be even"):
        make_store(KVQuantSpec("int4", 3), B, H, CAPACITY, 63, torch.float32, "cpu")
    monkeypatch.setattr(kv_quant, "_cuda_capability", lambda index: (8, 0))
    # no GPU is needed to see the refusal: the check runs before any buffer is allocated on the device
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*use int8"):
        make_store(KVQuantSpec("fp8", 16), B, H, CAPACITY, D, torch.bfloat16, "cuda:0")
    assert isinstance(_store(None), DenseStore) and isinstance(_store(SPECS[1]), QuantizedStore)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bad_writes_and_reads_raise_and_change_nothing(spec):
    store, x = _store(spec), _tokens(4, 7)
    store.zero_from(0)
    before = _snapshot(store)
    bad = [
        (x, x[:, :, :3], 0, "of one shape"),
        (x[0], x[0], 0, r"\[B, H, N, D\]"),
        (x[:1], x[:1], 0, "do not fit a store of batch 2"),
        (x[..., :16], x[..., :16], 0, "heads of dim 32"),
        (x, x, CAPACITY - 3, "do not fit a store of 24"),
        (x, x, -1, "do not fit"),
        (x, x, torch.arange(3), "index must be a long tensor of the 4"),
        (x, x, torch.arange(4, dtype=torch.int32), "index must be a long tensor"),
        (x, x.to("meta"), 0, "store on cpu"),
    ]
    for keys, values, slots, message in bad:
        write = store.write_at if isinstance(slots, torch.Tensor) else store.write
        with pytest.raises(ValueError, match=message):
            write(keys, values, slots)
        assert _same(store, before)
    with pytest.raises(ValueError, match="cannot read 25 tokens"):
        store.read(CAPACITY + 1, torch.float32)
