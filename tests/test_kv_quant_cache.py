"""A quantized KV cache (``kv_quant``) in the model: its outputs against the float64 oracle run on the keys and values
the cache stored, dynamic and static decoding, byte accounting, generate, and refusals that change nothing."""

import math

import numpy as np
import pytest
import torch
from duo_reference import DEVICE, chunked_logits, device_model, oracle_logits, oracle_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duo_attn import DuoCache, DuoCacheError, StaticDuoCache, disable_duo_attention, enable_duo_attention_eval
from duo_attn import kv_quant as kv_quant_module
from duo_attn.compat import cache_kwargs, output_cache
from duo_attn.generate import generate
from duo_attn.kv_quant import KV_QUANT_KINDS, KVQuantSpec, bytes_per_token
from duo_attn.stores import DenseStore, QuantizedStore

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=2e-4, rtol=1e-4)
ORACLE_SLACK = 1e-4  # |our fp32 keys - the oracle's float64 keys|, far below any quantization step
_MODELS: dict = {}


def _model(arch):
    if arch not in _MODELS:
        _MODELS[arch] = device_model(arch)
    return _MODELS[arch]


def _batch(rng, vocab, pads, length):
    ids = torch.from_numpy(rng.integers(1, vocab, (len(pads), length)))
    padding = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        padding[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, padding


def _fresh(chunks: list[int]) -> torch.Tensor:
    """``[T, T]``: query i sees key j as computed, not as stored: both in one forward pass of several tokens."""
    pass_of = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(chunks))
    several = torch.tensor(chunks)[pass_of] > 1
    return (pass_of[:, None] == pass_of[None, :]) & several[:, None]


def _stored(cache, retrieval_mask, length):
    """Per layer, the retrieval heads' keys and values as the cache dequantizes them, at their heads' places in the
    model's original order (the store holds them in ascending original order, whether or not heads were reordered)."""
    stored = []
    for layer, row in zip(cache.layers, retrieval_mask):
        keys, values = layer.store.read(length, torch.float64)
        full = [torch.zeros(keys.shape[0], row.size, length, keys.shape[3], dtype=torch.float64) for _ in "kv"]
        for target, source in zip(full, (keys, values)):
            target[:, np.flatnonzero(row)] = source.cpu()
        stored.append(tuple(full))
    return stored


def _assert_stores_hold_the_quantized_tokens(oracle, cache, retrieval_mask, padding, spec):
    """What each store holds is the quantization of the oracle's own keys and values of the same token and head,
    within kv_quant.quantize's stated bound: a token written to the wrong slot or head would be far off."""
    real = padding.bool()
    for attn, layer, row in zip((lyr.self_attn for lyr in oracle.model.layers), cache.layers, retrieval_mask):
        length = padding.shape[1]
        read = layer.store.read(length, torch.float64)
        for own, codes, stored in zip(attn.oracle_kv, (layer.store.keys, layer.store.values), read):
            own = own[:, np.flatnonzero(row)]
            scale = codes.scale[:, :, :length].double().cpu().repeat_interleave(spec.group_size, -1)
            error = (own - stored.cpu()).abs()
            bound = torch.maximum(own.abs() / 16, scale / 1024) if spec.kind == "fp8" else scale / 2
            assert (error <= bound + ORACLE_SLACK)[real[:, None, :, None].expand_as(error)].all()


def _run_and_check(model, mask, sink, recent, kind, ids, padding, chunks, cache_factory=None):
    oracle = oracle_model(model, mask, sink, recent)
    enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent, kv_quant=kind)
    try:
        cache = None if cache_factory is None else cache_factory(model)
        ours, cache = chunked_logits(model, ids, padding, chunks, cache)
    finally:
        disable_duo_attention(model)
    spec = cache.layers[0].spec
    assert all(isinstance(layer.store, QuantizedStore) for layer in cache.layers if layer.store is not None)
    expected = oracle_logits(oracle, ids, padding, _stored(cache, mask, ids.shape[1]), _fresh(chunks))
    real = padding.bool()
    torch.testing.assert_close(ours[real].double(), expected[real], **TOL)
    _assert_stores_hold_the_quantized_tokens(oracle, cache, mask, padding, spec)
    return ours, cache


def _every_layer_has_a_retrieval_head(rng, layers, kv_heads):
    mask = rng.random((layers, kv_heads)) < 0.5
    mask[np.arange(layers), rng.integers(0, kv_heads, layers)] = True
    return mask


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["llama", "qwen2"]),
    kind=st.sampled_from(KV_QUANT_KINDS),
    pads=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    sink=st.integers(0, 3),
    recent=st.integers(1, 7),
    chunks=st.lists(st.sampled_from([1, 1, 2, 3, 5, 8, 13]), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_dynamic_cache_matches_the_oracle_on_the_stored_keys(arch, kind, pads, sink, recent, chunks, seed):
    """Random patterns, chunk schedules and left padding: chunks see themselves in full precision and earlier tokens
    as stored; one-token steps read every key from the store."""
    model = _model(arch)
    cfg = model.config
    rng = np.random.default_rng(seed)
    if sum(chunks) <= max(pads):  # every row has a real token
        chunks.append(max(pads) + 1 - sum(chunks))
    ids, padding = _batch(rng, cfg.vocab_size, pads, sum(chunks))
    mask = _every_layer_has_a_retrieval_head(rng, cfg.num_hidden_layers, cfg.num_key_value_heads)
    _run_and_check(model, mask, sink, recent, kind, ids, padding, chunks)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["llama", "qwen2"]),
    kind=st.sampled_from(KV_QUANT_KINDS),
    pads=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    sink=st.integers(0, 3),
    recent=st.integers(1, 6),
    prompt_chunks=st.lists(st.integers(2, 9), min_size=1, max_size=2),
    steps=st.integers(1, 8),
    tail=st.sampled_from([0, 3]),
    seed=st.integers(0, 2**16),
)
def test_static_decoding_matches_the_oracle_on_the_stored_keys(
    arch, kind, pads, sink, recent, prompt_chunks, steps, tail, seed
):
    """A StaticDuoCache: pre-fill chunks, static steps through the store's decode kernel (the reference path on a
    CPU), and optionally a chunk after them."""
    model = _model(arch)
    cfg = model.config
    rng = np.random.default_rng(seed)
    prompt_chunks[0] += sink + max(pads)  # every row has its sinks before static decoding
    chunks = [*prompt_chunks, *[1] * steps, *([tail] if tail else [])]
    ids, padding = _batch(rng, cfg.vocab_size, pads, sum(chunks))
    mask = _every_layer_has_a_retrieval_head(rng, cfg.num_hidden_layers, cfg.num_key_value_heads)
    capacity = sum(chunks) + int(rng.integers(0, 40))
    _, cache = _run_and_check(
        model, mask, sink, recent, kind, ids, padding, chunks, lambda m: StaticDuoCache.for_model(m, capacity)
    )
    assert isinstance(cache, StaticDuoCache) and int(cache.get_seq_length()) == sum(chunks)


def test_decode_steps_read_the_codes_in_place_and_prefill_keeps_no_dense_copy(monkeypatch):
    """No read of the whole store (a dequantized copy) in any one-token step, dynamic or static; after pre-fill a
    layer holds codes, scales and zeros and the streaming slots, nothing else of the context."""
    model = _model("llama")
    cfg = model.config
    mask = np.array([[True, False]] * cfg.num_hidden_layers)
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=3, kv_quant="int4")
    try:
        ids = torch.randint(1, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        for cache in (DuoCache.for_model(model), StaticDuoCache.for_model(model, 40)):
            _, cache = chunked_logits(model, ids[:, :20], torch.ones(2, 20, dtype=torch.long), [8, 12], cache)
            for layer in cache.layers:
                dense = [t for t in layer.store.tensors() if t.is_floating_point() and t.dtype != torch.float16]
                assert isinstance(layer.store, QuantizedStore) and not dense
            with monkeypatch.context() as patched:
                for name in ("_read", "_read_with_chunk"):
                    patched.setattr(QuantizedStore, name, lambda *a: pytest.fail("a decode step read the store"))
                for t in range(20, 25):
                    model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
    finally:
        disable_duo_attention(model)


@pytest.mark.parametrize("kind", [None, *KV_QUANT_KINDS])
def test_cache_bytes_count_codes_scales_and_zeros(kind):
    model = _model("llama")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    mask = np.array([[True, False], [True, True]])
    sink, recent, batch, seen = 2, 4, 2, 37
    state = enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent, kv_quant=kind)
    try:
        ids = torch.randint(1, cfg.vocab_size, (batch, seen), generator=torch.Generator().manual_seed(1))
        _, cache = chunked_logits(model, ids, torch.ones_like(ids), [30, 7])
        static = StaticDuoCache.for_model(model, 300)
        _, static = chunked_logits(model, ids, torch.ones_like(ids), [30, 7], static)
    finally:
        disable_duo_attention(model)
    spec = state.kv_quant
    assert spec == (None if kind is None else KVQuantSpec(kind, math.gcd(32, head_dim)))
    per_head_token = 2 * head_dim * 4 if spec is None else 2 * bytes_per_token(spec, 1, head_dim)  # K + V, fp32
    streaming = 2 * batch * int((~mask).sum()) * (sink + recent) * head_dim * 4  # always the model dtype
    retrieval_heads = int(mask.sum())
    assert cache.nbytes() == batch * retrieval_heads * seen * per_head_token + streaming
    assert cache.nbytes(allocated=True) == batch * retrieval_heads * 256 * per_head_token + streaming
    assert static.nbytes() == cache.nbytes()
    assert static.nbytes(allocated=True) == batch * retrieval_heads * static.capacity * per_head_token + streaming
    store = cache.layers[0].store
    assert isinstance(store, DenseStore if spec is None else QuantizedStore)
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in store.tensors())  # every buffer counted


def test_generate_greedy_beam_and_static_agree_with_kv_quant():
    """model.generate (dynamic cache) and duo_attn.generate (static cache, one-token steps through the decode
    kernel's path) give the same greedy tokens; beam search reorders the quantized stores."""
    model = _model("qwen2")
    cfg = model.config
    mask = np.random.default_rng(2).random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    ids = torch.randint(1, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=4, kv_quant="int8")
    try:
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
            one_beam = model.generate(ids, max_new_tokens=10, num_beams=1, do_sample=False, pad_token_id=0)
            beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(generate(model, ids, 10, prefill_chunk=17), greedy[:, ids.shape[1] :])
        assert torch.equal(one_beam, greedy) and beams.shape == (2, 23)
    finally:
        disable_duo_attention(model)


@pytest.mark.parametrize("static", [False, True])
def test_beam_reorder_moves_every_buffer_of_a_quantized_store(static):
    model = _model("llama")
    cfg = model.config
    enable_duo_attention_eval(model, np.array([[True, False]] * 2), sink_size=2, recent_size=3, kv_quant="fp8")
    try:
        ids = torch.randint(1, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
        cache = StaticDuoCache.for_model(model, 20) if static else None
        _, cache = chunked_logits(model, ids, torch.ones_like(ids), [12], cache)
        layer = cache.layers[0]
        before = [t.view(torch.uint8).clone() for t in (*layer.store.tensors(), layer.stream_keys)]
        addresses = [t.data_ptr() for t in layer.store.tensors()]
        order = torch.tensor([2, 0, 1])
        cache.reorder_cache(order)
        after = [t.view(torch.uint8) for t in (*layer.store.tensors(), layer.stream_keys)]
        assert all(torch.equal(a, b[order]) for a, b in zip(after, before))
        assert ([t.data_ptr() for t in layer.store.tensors()] == addresses) == static  # in place when static
    finally:
        disable_duo_attention(model)


def _unchanged(model, state_before):
    assert getattr(model, "duo_attention", None) is state_before
    if state_before is None:
        assert model.config._attn_implementation != "duo_attn" and not model.base_model._forward_pre_hooks


@pytest.mark.parametrize(
    "kv_quant, message",
    [
        ("int3", "unknown KV quantization 'int3'"),
        ("int4-g5", "not a multiple of the quantization group size 5"),
        (4, "kv_quant must be None, a name"),
    ],
)
@pytest.mark.parametrize("patched_before", [False, True])
def test_bad_kv_quant_is_refused_and_changes_nothing(kv_quant, message, patched_before):
    model = device_model("llama")
    mask = np.ones((2, 2))
    state = enable_duo_attention_eval(model, mask, sink_size=1, recent_size=2) if patched_before else None
    with pytest.raises(ValueError, match=message):
        enable_duo_attention_eval(model, mask, sink_size=1, recent_size=2, kv_quant=kv_quant)
    _unchanged(model, state)


def test_int4_with_an_odd_head_dim_and_fp8_on_an_old_gpu_are_refused(monkeypatch):
    # RoPE needs an even rotary dimension; a partial rotary factor gives heads of 15 channels (14 rotated)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 14 / 15}
    odd = device_model("llama", head_dim=15, rope_parameters=rope)
    with pytest.raises(ValueError, match="head_dim must be even; got 15"):
        enable_duo_attention_eval(odd, np.ones((2, 2)), sink_size=1, recent_size=2, kv_quant="int4")
    _unchanged(odd, None)
    model = device_model("llama")
    # no GPU is needed to see the refusal: the check reads the device and its capability before touching the model
    monkeypatch.setattr(kv_quant_module, "_cuda_capability", lambda index: (8, 0))
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda:0")))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*use int8"):
        enable_duo_attention_eval(model, np.ones((2, 2)), sink_size=1, recent_size=2, kv_quant="fp8")
    _unchanged(model, None)


def test_a_cache_of_another_kv_quant_is_refused_before_it_changes():
    model = _model("llama")
    cfg = model.config
    mask = np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool)
    with pytest.raises(ValueError, match="unknown KV quantization 'nf4'"):
        DuoCache(mask, 1, 2, cfg.num_attention_heads, kv_quant="nf4")
    ids = torch.randint(1, cfg.vocab_size, (1, 5), device=DEVICE)
    enable_duo_attention_eval(model, mask, sink_size=1, recent_size=2, kv_quant="int4")
    try:
        for foreign, message in (
            (DuoCache(mask, 1, 2, cfg.num_attention_heads), r"model dtype \(kv_quant=None\).*'int4-g16'"),
            (DuoCache(mask, 1, 2, cfg.num_attention_heads, kv_quant="int8"), "kv_quant='int8-g16'"),
            (DuoCache(mask, 1, 2, cfg.num_attention_heads, kv_quant="int4-g32"), "does not fit the model"),
        ):
            with pytest.raises(DuoCacheError, match=message):
                model(ids, **cache_kwargs(model, foreign))
            assert foreign.get_seq_length() == 0 and foreign.state.real_seen is None
        # the same kind by name or by spec is the model's own
        for same in ("int4", KVQuantSpec("int4", 16)):
            cache = output_cache(model(ids, **cache_kwargs(model, DuoCache(mask, 1, 2, cfg.num_attention_heads, kv_quant=same))))
            assert cache.get_seq_length() == 5
    finally:
        disable_duo_attention(model)


def test_model_generate_compiles_its_quantized_static_steps():
    """transformers' compiled decode step (forced on the CPU, eager backend) over a quantized StaticDuoCache: the
    store's device-index write and decode op trace into the step, and give the eager dynamic cache's tokens."""
    from transformers import CompileConfig

    model = _model("llama")
    cfg = model.config
    mask = np.array([[True, False], [False, True]])
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    ids = torch.randint(1, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    enable_duo_attention_eval(model, mask, sink_size=4, recent_size=5, kv_quant="int4")
    try:
        runs = [
            model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **extra)
            for extra in ({"disable_compile": True}, {"compile_config": compile_config})
        ]
        assert torch.equal(runs[0], runs[1]) and model.duo_attention.static_capacity >= 19
    finally:
        disable_duo_attention(model)
