"""Static decoding (device-side counters, reserved buffers), its Triton kernel, CUDA-graph replay and `generate`."""

import numpy as np
import pytest
import torch
from duo_attn.compat import cache_kwargs
from duo_reference import DEVICE, chunked_logits, device_model, oracle_logits, oracle_model, position_ids_for
from helpers import padded_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duo_attn import DuoCache, DuoCacheError, StaticDuoCache, disable_duo_attention, enable_duo_attention_eval
from duo_attn.generate import StaticDecoder, generate
from duo_attn.kernels.decode import triton_decode_attention
from duo_attn.patch import SUPPORTED_MODEL_TYPES

TOL = dict(atol=2e-4, rtol=1e-4)
_MODELS: dict = {}


def _model(arch):
    if arch not in _MODELS:
        _MODELS[arch] = device_model(arch)
    return _MODELS[arch]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(SUPPORTED_MODEL_TYPES),
    batch=st.integers(1, 3),
    pads=st.lists(st.integers(0, 5), min_size=3, max_size=3),
    sink=st.integers(0, 4),
    recent=st.integers(0, 7),
    prefill=st.integers(0, 12),
    steps=st.integers(1, 14),
    back_to_dynamic=st.booleans(),
    pass_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_static_steps_match_the_oracle(
    arch, batch, pads, sink, recent, prefill, steps, back_to_dynamic, pass_mask, seed
):
    if sink + recent == 0:
        recent = 1
    model = _model(arch)
    cfg = model.config
    rng = np.random.default_rng(seed)
    mask = rng.random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    pads = pads[:batch]
    prompt = sink + max(pads) + prefill + 1  # every row has at least `sink` real tokens
    tail = 5 if back_to_dynamic else 0
    ids, padding = padded_batch(rng, cfg.vocab_size, batch, prompt + steps + tail, pads)
    oracle = oracle_model(model, mask, sink, recent)
    enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent)
    try:
        cache = StaticDuoCache.for_model(model, prompt + steps + tail + int(rng.integers(0, 300)))
        logits, cache = chunked_logits(model, ids[:, :prompt], padding[:, :prompt], [prompt], cache)
        ids_d, padding_d = ids.to(DEVICE), padding.to(DEVICE)
        with torch.no_grad():
            for t in range(prompt, prompt + steps):
                kwargs = {"attention_mask": padding_d[:, : t + 1]} if pass_mask else {}
                out = model(input_ids=ids_d[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True, **kwargs)
                logits = torch.cat([logits, out.logits.cpu()], dim=1)
        assert int(cache.get_seq_length()) == prompt + steps
        if back_to_dynamic:  # a chunk after static steps: planned eagerly over the reserved buffers
            end = prompt + steps
            with torch.no_grad():
                out = model(
                    input_ids=ids_d[:, end:],
                    attention_mask=padding_d,
                    position_ids=position_ids_for(padding_d)[:, end:],
                    **cache_kwargs(model, cache),
                    use_cache=True,
                )
            logits = torch.cat([logits, out.logits.cpu()], dim=1)
    finally:
        disable_duo_attention(model)
    real = padding.bool()
    torch.testing.assert_close(logits[real].double(), oracle_logits(oracle, ids, padding)[real], **TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_matches_transformers_generate(arch):
    """Same greedy tokens as ``model.generate`` on the dynamic cache: left padding, a prompt shorter than the sink
    (its first tokens decoded dynamically), chunked pre-fill and eos handling."""
    model = _model(arch)
    cfg = model.config
    rng = np.random.default_rng(5)
    mask = rng.random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    enable_duo_attention_eval(model, mask, sink_size=6, recent_size=5)
    try:
        ids, padding = padded_batch(rng, cfg.vocab_size, 2, 9, [4, 0])
        ids, padding = ids.to(DEVICE), padding.to(DEVICE)
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=padding, max_new_tokens=20, do_sample=False, pad_token_id=0)
        ours = generate(model, ids, 20, attention_mask=padding, prefill_chunk=4)
        assert torch.equal(ours, expected[:, ids.shape[1] :])
        eos = int(ours[0, 3])
        stopped = generate(model, ids, 20, attention_mask=padding, eos_token_id=eos)
        first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in ours]
        for row, cut in enumerate(first):
            if cut is not None:
                assert torch.equal(stopped[row, : cut + 1], ours[row, : cut + 1])
                assert (stopped[row, cut:] == eos).all()
    finally:
        disable_duo_attention(model)


def test_static_cache_refuses_bad_use_and_changes_nothing():
    model = _model("llama")
    cfg = model.config
    mask = np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool)
    mask[0, 0] = False
    enable_duo_attention_eval(model, mask, sink_size=4, recent_size=4)
    try:
        cache = StaticDuoCache.for_model(model, 20)
        assert cache.capacity % 256 == 0  # rounded up to a growth block
        with pytest.raises(DuoCacheError, match="pre-filled StaticDuoCache"):
            StaticDecoder(model, cache)
        ids = torch.randint(1, cfg.vocab_size, (2, 10)).to(DEVICE)
        short = torch.ones_like(ids)
        short[0, :7] = 0
        _, cache = chunked_logits(model, ids, torch.ones_like(ids), [10], cache)
        assert cache.layers[1].store.capacity == cache.capacity
        with pytest.raises(DuoCacheError, match="real tokens only"):
            model(
                input_ids=ids[:, :1],
                attention_mask=torch.cat([short, torch.zeros_like(short[:, :1])], 1),
                **cache_kwargs(model, cache),
            )
        before = cache.real_seen.clone()
        with pytest.raises(DuoCacheError, match="fixed batch size"):
            cache.batch_repeat_interleave(2)
        assert torch.equal(cache.real_seen, before) and int(cache.get_seq_length()) == 10
        with pytest.raises(ValueError, match="shape"):
            StaticDecoder(model, cache, cuda_graph=False)(ids[:1, :1])
        cache.planner.capacity = cache.seen  # as if the reserved buffers were used up
        with pytest.raises(DuoCacheError, match="full"):
            model(input_ids=ids[:, :1], **cache_kwargs(model, cache))
        with pytest.raises(DuoCacheError, match="DuoCache"):
            StaticDecoder(model, DuoCache.for_model(model))
        with pytest.raises(ValueError, match="left padding"):
            generate(
                model, ids, 3, attention_mask=torch.cat([torch.ones_like(short), torch.zeros_like(short)], 1)[:, 5:15]
            )
    finally:
        disable_duo_attention(model)


needs_triton = pytest.mark.skipif(triton_decode_attention is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize(
    "batch,kv_heads,groups,capacity,head_dim,length,dtype,padded",
    [
        (2, 3, 1, 300, 64, 257, torch.float32, False),  # MHA, several splits, a partial last block
        (2, 2, 4, 500, 96, 130, torch.float32, True),  # GQA, head_dim not a power of two, padding keys
        (1, 1, 8, 40, 16, 1, torch.float16, False),  # one valid key
        (1, 2, 2, 1000, 32, 1000, torch.float16, True),  # the whole buffer
    ],
)
def test_triton_decode_kernel_matches_masked_attention(
    batch, kv_heads, groups, capacity, head_dim, length, dtype, padded
):
    """The split-KV kernel (run by Triton's interpreter without a GPU) against dense float64 attention."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(capacity)
    q, k, v = (
        torch.randn(batch, h, n, head_dim, generator=gen, dtype=dtype).to(device)
        for h, n in ((kv_heads * groups, 1), (kv_heads, capacity), (kv_heads, capacity))
    )
    k[:, :, length:] = float("nan")  # beyond the length: never read
    key_pos = None
    if padded:
        key_pos = torch.arange(capacity).repeat(batch, 1)
        key_pos[0, :17] = -1
        key_pos[-1, 5:9] = -1
        key_pos = key_pos.to(device)
    length_t = torch.tensor([length], dtype=torch.int32, device=device)
    out = triton_decode_attention(q, k, v, length_t, key_pos, head_dim**-0.5)
    valid = torch.arange(capacity, device=device)[None] < length
    valid = valid & (key_pos >= 0) if key_pos is not None else valid.expand(batch, -1)
    scores = q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2) * head_dim**-0.5
    scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    expected = scores.softmax(-1).nan_to_num() @ v.double().repeat_interleave(groups, 1).nan_to_num()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_match_eager_static_steps():
    model = device_model("llama").cuda()
    cfg = model.config
    mask = np.random.default_rng(0).random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    enable_duo_attention_eval(model, mask, sink_size=4, recent_size=8)
    ids = torch.randint(1, cfg.vocab_size, (2, 60), device="cuda")
    results = []
    for graph in (False, True):
        cache = StaticDuoCache.for_model(model, 60)
        _, cache = chunked_logits(model, ids[:, :30], torch.ones_like(ids[:, :30]), [30], cache)
        decoder = StaticDecoder(model, cache, cuda_graph=graph)
        results.append(torch.stack([decoder(ids[:, t : t + 1]) for t in range(30, 60)], 1))
        assert int(cache.get_seq_length()) == 60 and (decoder.graph is not None) == graph
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    disable_duo_attention(model)


@pytest.mark.slow
def test_smollm2_generate_with_the_shipped_pattern_matches_transformers_generate():
    """The real model and the shipped learned pattern: the static path (reordered heads, static cache, decode kernel
    or its SDPA stand-in) produces transformers' greedy tokens exactly."""
    pytest.importorskip("gguf")
    from pathlib import Path

    from duo_attn.models import load_model

    try:
        model, tokenizer = load_model("smollm2", device=DEVICE)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    pattern = (
        Path(__file__).resolve().parents[1] / "attn_patterns" / "SmolLM2-135M-Instruct" / "learned-sink64-recent256"
    )
    enable_duo_attention_eval(model, pattern, sparsity=0.5)
    try:
        text = (
            "The grass is green. The sky is blue. " * 25
            + "The pass key is 71432. Remember it. "
            + "The sun is warm. " * 20
        )
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text + "What is the pass key?"}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        ours = generate(model, ids, 16, prefill_chunk=128)
        assert torch.equal(ours, expected[:, ids.shape[1] :])
        assert "71432" in tokenizer.decode(ours[0])  # at 50% streaming heads the model still retrieves the key
    finally:
        disable_duo_attention(model)


def test_generate_cli_compares_the_paths_on_a_local_model(tmp_path, capsys):
    from helpers import byte_level_tokenizer, tiny_llama

    from duo_attn.generate import main
    from duo_attn.patterns import save_attn_pattern

    tokenizer = byte_level_tokenizer(["the pass key is 12345, remember it. " * 20], 300, chatml=True)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_attn_pattern(tmp_path / "pattern", np.array([[0.9, 0.1], [0.2, 0.8]]), sink_size=4, recent_size=8)
    main(
        [
            "--model",
            str(tmp_path / "model"),
            "--pattern",
            str(tmp_path / "pattern"),
            "--max-new-tokens",
            "6",
            "--prompt",
            "the pass key is 12345. " * 8,
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0] for row in rows] == [
        "| model.generate, unpatched (dynamic cache)",
        '| model.generate, unpatched, cache_implementation="static"',
        "| model.generate, duo-patched",
        "| model.generate, duo-patched, disable_compile=True",
        "| duo_attn.generate, eager steps",
    ]
    assert rows[0][2] == rows[1][2]  # transformers' two caches generate the same text
    assert rows[2][2] == rows[3][2] == rows[4][2]  # so do the duo paths
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "model"), "--pattern", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: generate passes masks per layer type
def test_model_generate_compiles_its_steps_on_a_static_duo_cache(arch):
    """transformers' own compile path (forced on the CPU through its testing switch, eager backend): greedy, seeded
    sampling and a left-padded batch give the tokens of the eager dynamic cache."""
    from transformers import CompileConfig

    model = _model(arch)
    cfg = model.config
    mask = np.random.default_rng(3).random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    enable_duo_attention_eval(model, mask, sink_size=4, recent_size=5)
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    ids, padding = padded_batch(np.random.default_rng(4), cfg.vocab_size, 2, 12, [3, 0])
    ids, padding = ids.to(DEVICE), padding.to(DEVICE)
    try:
        for options in ({"do_sample": False}, {"do_sample": True, "top_k": 20, "temperature": 0.8}):
            runs = []
            for compiled in (False, True):
                torch.manual_seed(0)
                extra = {"compile_config": compile_config} if compiled else {"disable_compile": True}
                runs.append(model.generate(ids, attention_mask=padding, max_new_tokens=8, pad_token_id=0, **options,
                                           **extra))  # fmt: skip
            assert torch.equal(runs[0], runs[1]), options
        assert model.duo_attention.static_capacity >= 19  # max_length - 1
    finally:
        disable_duo_attention(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers auto-compiles generate on a GPU only")
def test_model_generate_on_cuda_compiles_with_inductor_and_graphs_and_matches_eager():
    """What a user gets on a GPU: generate's default compile (inductor, CUDA graphs) on a StaticDuoCache, traced
    once for two calls of different lengths, with the tokens of the eager dynamic cache."""
    import torch._dynamo

    model = device_model("llama").cuda()
    cfg = model.config
    mask = np.random.default_rng(5).random((cfg.num_hidden_layers, cfg.num_key_value_heads)) < 0.5
    enable_duo_attention_eval(model, mask, sink_size=4, recent_size=8)
    ids, padding = _padded_batch(np.random.default_rng(6), cfg.vocab_size, 2, 40, [5, 0])
    ids, padding = ids.cuda(), padding.cuda()
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    try:
        traced = []
        for new in (24, 16):
            eager = model.generate(ids, attention_mask=padding, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                   disable_compile=True)  # fmt: skip
            compiled = model.generate(ids, attention_mask=padding, max_new_tokens=new, do_sample=False, pad_token_id=0)
            assert torch.equal(compiled, eager), new
            traced.append(graphs["unique_graphs"])
        assert traced[0] >= 1 and traced[1] == traced[0], traced  # compiled, and not traced again for the 2nd call
    finally:
        disable_duo_attention(model)
