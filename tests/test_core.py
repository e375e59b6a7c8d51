"""The inference path (patch + kv_cache + attention) against the dense oracle in duo_reference.py."""

import numpy as np
import pytest
import torch
from duo_reference import DEVICE, chunked_logits, device_model, oracle_logits, oracle_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from duo_attn.compat import cache_kwargs, output_cache
from duo_attn import DuoCache, DuoCacheError, ModelError, PatternError, disable_duo_attention, enable_duo_attention_eval
from duo_attn.patch import SUPPORTED_MODEL_TYPES

TOL = dict(atol=2e-4, rtol=1e-4)


def _compare_real_positions(ours, oracle, padding_mask):
    real = padding_mask.bool().cpu()
    torch.testing.assert_close(ours[real].double(), oracle[real], **TOL)


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_all_retrieval_heads_match_the_unpatched_model(arch):
    model = device_model(arch)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        plain_logits = model(ids).logits
        plain_chunks, _ = chunked_logits(model, ids, torch.ones_like(ids), [20, 9, 1, 1, 6])
        plain_generation = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    enable_duo_attention_eval(model, np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads)), sink_size=2, recent_size=4)
    with torch.no_grad():
        out = model(ids)
        chunks, cache = chunked_logits(model, ids, torch.ones_like(ids), [20, 9, 1, 1, 6])
        generation = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert isinstance(output_cache(out), DuoCache) and isinstance(cache, DuoCache)
    torch.testing.assert_close(out.logits, plain_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunks, plain_chunks, atol=1e-5, rtol=1e-5)
    assert torch.equal(generation, plain_generation)


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_all_streaming_heads_match_the_sink_window_reference(arch):
    model = device_model(arch)
    cfg = model.config
    mask = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads))
    oracle = oracle_model(model, mask, sink=3, recent=5)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    padding = torch.ones_like(ids)
    enable_duo_attention_eval(model, mask, sink_size=3, recent_size=5)
    for schedule in ([40], [7, 13, 20], [10] + [1] * 30):
        ours, _ = chunked_logits(model, ids, padding, schedule)
        _compare_real_positions(ours, oracle_logits(oracle, ids, padding), padding)
    # and the no-cache path (use_cache=False) applies the same rule
    with torch.no_grad():
        uncached = model(ids, use_cache=False).logits.cpu()
    _compare_real_positions(uncached, oracle_logits(oracle, ids, padding), padding)


@st.composite
def duo_cases(draw):
    arch = draw(st.sampled_from(SUPPORTED_MODEL_TYPES))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(6, 48))
    pads = [draw(st.integers(0, min(6, length - 1))) for _ in range(batch)]
    sink = draw(st.integers(0, 4))
    recent = draw(st.integers(0 if sink else 1, 9))
    chunks, left = [], length
    while left:
        size = draw(st.sampled_from([1, 1, 2, 3, 5, 8, 13, 21]))
        chunks.append(min(size, left))
        left -= chunks[-1]
    seed = draw(st.integers(0, 2**16))
    return arch, batch, length, pads, sink, recent, chunks, seed


_MODELS = {arch: None for arch in SUPPORTED_MODEL_TYPES}


def _shared_model(arch):
    if _MODELS[arch] is None:
        _MODELS[arch] = device_model(arch)
    return _MODELS[arch]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(duo_cases())
def test_random_patterns_schedules_and_padding_match_the_oracle(case):
    arch, batch, length, pads, sink, recent, chunks, seed = case
    model = _shared_model(arch)
    cfg = model.config
    rng = np.random.default_rng(seed)
    mask = rng.random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    ids = torch.from_numpy(rng.integers(1, cfg.vocab_size, (batch, length)))
    padding = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        padding[row, :pad] = 0
        ids[row, :pad] = 0
    oracle = oracle_model(model, mask, sink, recent)
    enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent)
    try:
        ours, cache = chunked_logits(model, ids, padding, chunks)
    finally:
        disable_duo_attention(model)
    assert cache.get_seq_length() == length
    _compare_real_positions(ours, oracle_logits(oracle, ids, padding), padding)


def test_left_padded_generate_matches_unpadded_rows():
    """Padding is never a sink or a window token: a padded row generates what it generates alone."""
    model = device_model("llama")
    cfg = model.config
    enable_duo_attention_eval(model, np.eye(cfg.num_hidden_layers, cfg.num_key_value_heads), sink_size=2, recent_size=3)
    gen = torch.Generator().manual_seed(3)
    long_row = torch.randint(1, cfg.vocab_size, (1, 30), generator=gen).to(DEVICE)
    short_row = torch.randint(1, cfg.vocab_size, (1, 21), generator=gen).to(DEVICE)
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, 9, dtype=torch.long, device=DEVICE), short_row], 1)])
    padding = (torch.arange(30)[None] >= torch.tensor([[0], [9]])).long().to(DEVICE)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=padding, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = model.generate(short_row, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(together[1, 9:], alone[0])


def test_cache_bytes_follow_the_formula_and_streaming_stays_constant():
    model = device_model("llama")
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    mask = np.zeros((layers, kv_heads), dtype=bool)
    mask[0, 0] = True
    sink, recent, batch = 4, 8, 2
    enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent)
    ids = torch.randint(1, cfg.vocab_size, (batch, 100)).to(DEVICE)
    streaming_heads, retrieval_heads = int((~mask).sum()), int(mask.sum())
    per_token = 2 * batch * head_dim * 4  # K and V, fp32
    cache = None
    for seen in (30, 60, 100):
        _, cache = chunked_logits(model, ids[:, :seen], torch.ones(batch, seen, dtype=torch.long), [seen], None)
        expected = per_token * (retrieval_heads * seen + streaming_heads * (sink + recent))
        assert cache.nbytes() == expected
        assert cache.nbytes(allocated=True) >= expected
    # decoding further grows only the retrieval part
    before = cache.nbytes()
    with torch.no_grad():
        for t in range(5):
            model(ids[:, t : t + 1], attention_mask=torch.ones(batch, 101 + t, dtype=torch.long, device=DEVICE), **cache_kwargs(model, cache))
    assert cache.nbytes() - before == per_token * retrieval_heads * 5


def test_beam_search_runs_and_reorders_the_cache():
    model = device_model("qwen2")
    cfg = model.config
    mask = np.random.default_rng(0).random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    ids = torch.randint(1, cfg.vocab_size, (2, 25)).to(DEVICE)
    oracle_free = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    enable_duo_attention_eval(model, np.ones_like(mask), sink_size=2, recent_size=4)
    assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0), oracle_free)
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=4)
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 31)


def test_explicit_duo_cache_and_dynamic_cache_are_accepted():
    model = device_model("mistral")
    cfg = model.config
    mask = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool)
    mask[:, 0] = True
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=4)
    ids = torch.randint(1, cfg.vocab_size, (1, 20)).to(DEVICE)
    with torch.no_grad():
        implicit = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        explicit = model.generate(
            ids, max_new_tokens=5, do_sample=False, pad_token_id=0, **cache_kwargs(model, DuoCache.for_model(model))
        )
        replaced = output_cache(model(ids, **cache_kwargs(model, DynamicCache())))
    assert torch.equal(implicit, explicit)
    assert isinstance(replaced, DuoCache)


def test_cache_refuses_what_it_cannot_do():
    model = device_model("llama")
    cfg = model.config
    enable_duo_attention_eval(model, np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads)), sink_size=1, recent_size=2)
    cache = output_cache(model(torch.randint(1, cfg.vocab_size, (1, 10), device=DEVICE)))
    assert not cache.is_croppable
    with pytest.raises(DuoCacheError, match="cannot be cropped"):
        cache.crop(-2)
    with pytest.raises(DuoCacheError, match="batch of 1"):
        model(torch.randint(1, cfg.vocab_size, (2, 3), device=DEVICE), **cache_kwargs(model, cache))
    with pytest.raises(DuoCacheError, match="without being planned"):
        DuoCache.for_model(model).update(torch.zeros(1, 2, 1, 16, device=DEVICE), torch.zeros(1, 2, 1, 16, device=DEVICE), 0)


def test_disable_restores_the_model():
    model = device_model("qwen3")
    cfg = model.config
    original = cfg._attn_implementation
    ids = torch.randint(1, cfg.vocab_size, (1, 30)).to(DEVICE)
    with torch.no_grad():
        before = model(ids).logits
    enable_duo_attention_eval(model, np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads)), sink_size=1, recent_size=2)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    disable_duo_attention(model)
    assert cfg._attn_implementation == original and not hasattr(model, "duo_attention")
    assert not model.base_model._forward_pre_hooks
    with torch.no_grad():
        out = model(ids)
    assert not isinstance(output_cache(out), DuoCache)
    torch.testing.assert_close(out.logits, before)


@pytest.mark.parametrize(
    "pattern, kwargs, message",
    [
        (np.ones((3, 2)), dict(sink_size=1, recent_size=2), "pattern has 3 layers but the model has 2"),
        (np.ones((2, 4)), dict(sink_size=1, recent_size=2), "4 KV heads per layer but the model has 2"),
        (np.ones((2, 2)), {}, "sink_size and recent_size are required"),
        (np.ones((2, 2)), dict(sink_size=-1, recent_size=2), "sink_size must be"),
        (np.ones((2, 2)), dict(sink_size=0, recent_size=0), "positive"),
        (np.full((2, 2), np.nan), dict(sink_size=1, recent_size=2), "non-finite"),
        (np.ones((2, 2)) * 0.5, dict(sink_size=1, recent_size=2, sparsity=2.0), "sparsity must be in"),
        (np.ones((2, 2)) * 0.5, dict(sink_size=1, recent_size=2, sparsity=0.75, min_retrieval_per_layer=1),
         "leaving at most 2 streaming heads"),
        (np.ones((2, 2)) * 0.5, dict(sink_size=1, recent_size=2, min_retrieval_per_layer=-1), "must be >= 0"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), dict(sink_size=1, recent_size=2, min_retrieval_per_layer=1),
         r"mask keeps fewer than min_retrieval_per_layer=1 retrieval heads in layer\(s\) 1"),
        ("/nonexistent/pattern", {}, "not found"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(pattern, kwargs, message):
    model = device_model("llama", num_hidden_layers=2)
    before = model.config._attn_implementation
    with pytest.raises(PatternError, match=message):
        enable_duo_attention_eval(model, pattern, **kwargs)
    assert model.config._attn_implementation == before and not hasattr(model, "duo_attention")
    assert not model.base_model._forward_pre_hooks


def test_the_floor_keeps_a_retrieval_head_in_every_layer():
    model = device_model("llama", num_hidden_layers=2)
    gates = np.array([[0.9, 0.8], [0.1, 0.2]])
    state = enable_duo_attention_eval(model, gates, sink_size=1, recent_size=2, sparsity=0.5)
    np.testing.assert_array_equal(state.retrieval_mask, [[True, True], [False, False]])
    state = enable_duo_attention_eval(model, gates, sink_size=1, recent_size=2, sparsity=0.5, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(state.retrieval_mask, [[True, False], [False, True]])
    state = enable_duo_attention_eval(model, gates, sink_size=1, recent_size=2, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(state.retrieval_mask, [[True, True], [False, True]])  # default threshold 0.5
    mask = np.array([[1.0, 0.0], [0.0, 1.0]])
    state = enable_duo_attention_eval(model, mask, sink_size=1, recent_size=2, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(state.retrieval_mask, mask.astype(bool))  # a mask meeting the floor, as given
    disable_duo_attention(model)


def test_unsupported_model_gets_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(ModelError, match="supports model types"):
        enable_duo_attention_eval(model, np.ones((1, 2)), sink_size=1, recent_size=2)


def test_four_d_masks_are_refused():
    model = device_model("llama")
    cfg = model.config
    enable_duo_attention_eval(model, np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads)), sink_size=1, recent_size=2)
    with pytest.raises(ModelError, match="2-D padding mask"):
        model(torch.ones(1, 4, dtype=torch.long, device=DEVICE), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE))


@pytest.mark.slow
def test_smollm2_all_retrieval_generates_exactly_like_the_unpatched_model():
    pytest.importorskip("gguf")
    from duo_attn.models import load_model

    try:
        model, tokenizer = load_model("smollm2")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cfg = model.config
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List three facts about the moon. " * 20}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer([prompt, "The capital of France is"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        enable_duo_attention_eval(
            model, np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads)), sink_size=16, recent_size=64
        )
        duo = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(duo, plain)


def test_a_dropped_cache_frees_its_memory_without_the_garbage_collector():
    import gc
    import weakref

    model = device_model("llama")
    cfg = model.config
    mask = np.array([[True, False]] * cfg.num_hidden_layers)
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=4)
    with torch.no_grad():
        cache = output_cache(model(torch.randint(1, cfg.vocab_size, (1, 12), device=DEVICE)))
    held = [weakref.ref(cache.layers[0].store.keys), weakref.ref(cache.layers[0].stream_keys)]
    gc.disable()
    try:
        del cache
        assert all(ref() is None for ref in held), "a reference cycle keeps the KV tensors alive"
    finally:
        gc.enable()


def test_a_cache_can_be_deep_copied_and_both_copies_continue_alike():
    import copy

    model = device_model("llama")
    cfg = model.config
    enable_duo_attention_eval(model, np.array([[True, False]] * cfg.num_hidden_layers), sink_size=2, recent_size=4)
    ids = torch.randint(1, cfg.vocab_size, (1, 30), device=DEVICE)
    with torch.no_grad():
        cache = output_cache(model(ids[:, :20]))
        cache = output_cache(model(ids[:, 20:28], **cache_kwargs(model, cache)))
        twin = copy.deepcopy(cache)
        a = model(ids[:, 28:], **cache_kwargs(model, cache)).logits
        b = model(ids[:, 28:], **cache_kwargs(model, twin)).logits
    torch.testing.assert_close(a, b)


def test_reserve_preallocates_without_changing_results():
    model = device_model("llama")
    cfg = model.config
    mask = np.array([[True, False]] * cfg.num_hidden_layers)
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=4)
    ids = torch.randint(1, cfg.vocab_size, (1, 24), device=DEVICE)
    with torch.no_grad():
        plain = output_cache(model(ids[:, :20]))
        reserved = output_cache(model(ids[:, :20]))
        reserved.reserve(600)
        layer = reserved.layers[0]
        assert layer.store.capacity == 600
        before = layer.store.keys.data_ptr()
        for t in range(20, 24):
            a = model(ids[:, t : t + 1], **cache_kwargs(model, plain)).logits
            b = model(ids[:, t : t + 1], **cache_kwargs(model, reserved)).logits
            torch.testing.assert_close(a, b)
        assert layer.store.keys.data_ptr() == before, "decoding inside the reservation must not reallocate"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # q/k/v biases; per-head q/k norms
def test_head_reordering_keeps_outputs_and_disable_restores_the_weights(arch):
    model = device_model(arch)
    cfg = model.config
    original = {k: v.clone() for k, v in model.state_dict().items()}
    mask = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool)
    mask[:, -1] = True  # retrieval heads last: the reorder moves them first
    oracle = oracle_model(model, mask, 2, 3)
    ids = torch.randint(1, cfg.vocab_size, (1, 25), generator=torch.Generator().manual_seed(4))
    padding = torch.ones_like(ids)
    results = {}
    for reorder in (True, False):
        state = enable_duo_attention_eval(model, mask, sink_size=2, recent_size=3, reorder_heads=reorder)
        assert (state.head_orders is not None) == reorder
        attn = model.model.layers[0].self_attn
        assert attn.duo_layer_spec.layout.retrieval_first == reorder
        moved = not torch.equal(attn.k_proj.weight, original["model.layers.0.self_attn.k_proj.weight"])
        assert moved == reorder
        results[reorder], cache = chunked_logits(model, ids, padding, [10, 1, 1, 13])
        assert np.array_equal(cache.retrieval_mask[:, 0], [reorder] * cfg.num_hidden_layers)
        disable_duo_attention(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, original[key]), key
    expected = oracle_logits(oracle, ids, padding)
    for logits in results.values():
        torch.testing.assert_close(logits.double(), expected, **TOL)


def test_a_cache_built_for_another_head_order_is_refused():
    model = device_model("llama")
    cfg = model.config
    mask = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool)
    mask[:, -1] = True
    enable_duo_attention_eval(model, mask, sink_size=2, recent_size=3)
    foreign = DuoCache(mask, 2, 3, cfg.num_attention_heads)  # original order; the model's heads were reordered
    with pytest.raises(DuoCacheError, match="DuoCache.for_model"):
        model(torch.randint(1, cfg.vocab_size, (1, 5), device=DEVICE), **cache_kwargs(model, foreign))
    assert foreign.get_seq_length() == 0
    model(torch.randint(1, cfg.vocab_size, (1, 5), device=DEVICE), **cache_kwargs(model, DuoCache.for_model(model)))
