"""The transformers version seam (compat.py) and the patch's refusal to run without its cache, on whichever
transformers version is installed: CI runs this file at both ends of the supported range."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from duo_reference import DEVICE, device_model
from transformers import DynamicCache, StaticCache

from duo_attn import (
    DuoCache,
    DuoCacheError,
    ModelError,
    PatternError,
    TransformersVersionError,
    enable_duo_attention_eval,
)
from duo_attn.compat import (
    CACHE_NAMES,
    SUPPORTED_RANGE,
    TESTED_TRANSFORMERS,
    cache_argument,
    cache_kwargs,
    output_cache,
)

SINK, RECENT = 2, 4


def _patched(arch: str = "llama", all_retrieval: bool = False):
    model = device_model(arch)
    cfg = model.config
    mask = np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool)
    if not all_retrieval:
        mask[:, 0] = False
    enable_duo_attention_eval(model, mask, sink_size=SINK, recent_size=RECENT)
    return model


def _accepted_names(model) -> list[str]:
    """Every name the installed version accepts for the cache: the current one, and the deprecated one if any."""
    current = cache_argument(model)
    return [current] if current == "past_key_values" else [current, "past_key_values"]


def test_the_seam_reads_the_name_from_the_signature():
    model = device_model("llama")
    name = cache_argument(model)
    assert name in CACHE_NAMES and name == cache_argument(model.base_model)
    renamed = Version(transformers.__version__) >= Version("5.24")  # the release that renamed the argument
    assert name == ("cache" if renamed else "past_key_values")


def test_the_declared_range_is_the_one_ci_proves():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    assert declared["transformers"] == SpecifierSet(SUPPORTED_RANGE)
    assert all(version in declared["transformers"] for version in TESTED_TRANSFORMERS)
    assert "5.25.0" not in declared["transformers"] and "2.14.0" not in declared["torch"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert f"transformers=={TESTED_TRANSFORMERS[0]}" in ci
    assert transformers.__version__ in SpecifierSet(SUPPORTED_RANGE), "the installed transformers is outside the range"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_generate_and_an_explicit_cache_under_every_accepted_name(arch):
    """The regression test for transformers 5.24's rename: a patched model keeps its keys in a DuoCache whether it is
    called plainly, through generate, or with an explicit cache under the old or the new argument name."""
    model = _patched(arch)
    ids = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        plain = model(ids, use_cache=True)
        assert isinstance(output_cache(plain), DuoCache)
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for name in _accepted_names(model):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated name warns; that is transformers'
                cache = DuoCache.for_model(model)
                out = model(ids, use_cache=True, **{name: cache})
                assert output_cache(out) is cache and cache.get_seq_length() == 16
                step = model(ids[:, -1:], use_cache=True, **{name: cache})
                torch.testing.assert_close(step.logits[:, -1], model(torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1])
                cache = DuoCache.for_model(model)
                generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **{name: cache})
            assert torch.equal(generated, reference)
            assert cache.get_seq_length() == 16 + 5  # the last token is sampled, never fed back


def test_the_library_s_own_calls_emit_no_deprecation_warning():
    model = _patched()
    ids = torch.randint(1, model.config.vocab_size, (1, 12)).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            cache = DuoCache.for_model(model)
            out = model(ids, **cache_kwargs(model, cache), use_cache=True)
            assert output_cache(out) is cache
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))


@pytest.mark.parametrize(
    "make_cache",
    [
        lambda model: StaticCache(config=model.config, max_cache_len=64),
        lambda model: _filled_dynamic_cache(model),
    ],
    ids=["static-cache", "filled-dynamic-cache"],
)
def test_a_foreign_cache_is_refused_not_used(make_cache):
    model = _patched()
    ids = torch.randint(1, model.config.vocab_size, (1, 8)).to(DEVICE)
    foreign = make_cache(model)
    before = foreign.get_seq_length()
    with pytest.raises(DuoCacheError, match="must live in a DuoCache"):
        model(ids, **cache_kwargs(model, foreign), use_cache=True)
    assert foreign.get_seq_length() == before


def _filled_dynamic_cache(model):
    cache = DynamicCache(config=model.config)
    head_dim = model.config.head_dim
    kv = torch.zeros(1, model.config.num_key_value_heads, 3, head_dim, device=DEVICE)
    for layer in range(model.config.num_hidden_layers):
        cache.update(kv, kv, layer)
    return cache


def test_generate_s_static_cache_is_a_static_duo_cache_or_refused():
    model = _patched()
    ids = torch.randint(1, model.config.vocab_size, (1, 8)).to(DEVICE)
    dynamic = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(static, dynamic) and model.duo_attention.static_capacity > 0
    cfg = model.config
    enable_duo_attention_eval(model, np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads)), sink_size=SINK,
                              recent_size=RECENT, compile_generate=False)  # fmt: skip
    with pytest.raises(DuoCacheError, match="must live in a DuoCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_generate_s_offloaded_cache_is_refused_not_ignored():
    """An offloaded DynamicCache looks like generate's default one; replacing it would drop what the user asked for."""
    model = _patched()
    ids = torch.randint(1, model.config.vocab_size, (1, 8)).to(DEVICE)
    with pytest.raises(DuoCacheError, match="must live in a DuoCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="offloaded")


def test_the_cache_under_both_names_or_an_unknown_name_is_refused():
    model = _patched()
    ids = torch.randint(1, model.config.vocab_size, (1, 8)).to(DEVICE)
    with pytest.raises(TypeError, match="both"):
        model.base_model(ids, cache=DuoCache.for_model(model), past_key_values=DuoCache.for_model(model))
    with pytest.raises(TransformersVersionError, match="unknown argument name .kv."):
        model.base_model(ids, kv=DuoCache.for_model(model))


def test_keys_that_bypass_the_duo_cache_are_refused():
    """If a transformers release handed the layers another cache than the one the pre-hook planned, the attention
    function sees plain keys: it refuses instead of running with full keys and values."""
    model = _patched()
    attn = model.base_model.layers[0].self_attn
    spec = attn.duo_layer_spec
    q = torch.zeros(1, model.config.num_attention_heads, 1, model.config.head_dim, device=DEVICE)
    k = torch.zeros(1, model.config.num_key_value_heads, 5, model.config.head_dim, device=DEVICE)
    from duo_attn.attention import duo_attention_forward

    with pytest.raises(DuoCacheError, match="plain keys instead of its DuoCache"):
        duo_attention_forward(attn, q, k, k, None)
    spec.forward.cached = True
    with pytest.raises(DuoCacheError, match="transformers"):
        duo_attention_forward(attn, q, k[:, :, :1], k[:, :, :1], None)


def test_a_cache_used_outside_a_patched_model_names_the_cause():
    model = device_model("llama")
    cfg = model.config
    cache = DuoCache(np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads), dtype=bool), SINK, RECENT,
                     cfg.num_attention_heads)  # fmt: skip
    with pytest.raises(DuoCacheError, match="unpatched model"):
        model(torch.ones(1, 3, dtype=torch.long, device=DEVICE), **cache_kwargs(model, cache), use_cache=True)


def test_mistral_with_a_sliding_window_is_refused_and_left_unchanged():
    model = device_model("mistral")
    model.config.sliding_window = 8
    implementation = model.config._attn_implementation
    with pytest.raises(ModelError, match="sliding window of 8"):
        enable_duo_attention_eval(model, np.ones((2, 2)), sink_size=SINK, recent_size=RECENT)
    assert model.config._attn_implementation == implementation and not hasattr(model, "duo_attention")


@pytest.mark.parametrize("bad", ["0.5", True, float("nan"), 1.5])
def test_a_sparsity_that_is_not_a_number_in_range_is_refused(bad):
    model = device_model("llama")
    with pytest.raises(PatternError, match="sparsity"):
        enable_duo_attention_eval(model, np.full((2, 2), 0.5), sparsity=bad, sink_size=SINK, recent_size=RECENT)
    assert not hasattr(model, "duo_attention")
