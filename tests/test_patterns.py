import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from duo_attn.patterns import (
    PatternError,
    check_pattern_fits,
    load_attn_pattern,
    save_attn_pattern,
    sparsify_attention_heads,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference_patterns"
PUBLISHED = sorted(REFERENCE.glob("*/full_attention_heads.tsv"))


@pytest.mark.skipif(not PUBLISHED, reason="../shared/reference_patterns is not next to this checkout")
@pytest.mark.parametrize("tsv", PUBLISHED, ids=lambda p: p.parent.name)
def test_published_patterns_load_unchanged(tsv):
    raw = np.loadtxt(tsv, delimiter="\t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gates, sink, recent = load_attn_pattern(tsv.parent)
    assert any("clipped" in str(w.message) for w in caught) == ((raw < 0) | (raw > 1)).any()
    config = json.loads((tsv.parent / "config.json").read_text())
    assert (sink, recent) == (config["sink_size"], config["recent_size"]) == (128, 256)
    assert gates.shape == raw.shape and gates.shape[0] == 32
    assert gates.min() >= 0 and gates.max() <= 1
    np.testing.assert_array_equal(gates, np.clip(raw, 0, 1))


def test_save_then_load_round_trip(tmp_path):
    gates = np.random.default_rng(0).random((4, 3))
    save_attn_pattern(tmp_path / "p", gates, 16, 64, config={"lr": 0.02})
    loaded, sink, recent = load_attn_pattern(tmp_path / "p")
    np.testing.assert_array_equal(loaded, gates)
    assert (sink, recent) == (16, 64)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["lr"] == 0.02
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")], "temp files left behind"


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    directory = tmp_path / "p"
    save_attn_pattern(directory, np.ones((2, 2)), 4, 8)
    before = (directory / "full_attention_heads.tsv").read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_attn_pattern(directory, np.zeros((2, 2)), 4, 8)
    assert (directory / "full_attention_heads.tsv").read_bytes() == before
    assert {p.name for p in directory.iterdir()} == {"config.json", "full_attention_heads.tsv"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("0.5\t0.5\n0.5\n", "different numbers of columns"),
        ("0.5\tabc\n", "not a table of numbers"),
        ("0.5\tnan\n", "non-finite"),
        ("0.5\t3.0\n", r"must lie in \[0, 1\]"),
    ],
)
def test_bad_gate_tables_are_rejected(tmp_path, content, message):
    (tmp_path / "full_attention_heads.tsv").write_text(content)
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 8}))
    with pytest.raises(PatternError, match=message):
        load_attn_pattern(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"recent_size": 8}, "sink_size"),
        ({"sink_size": -1, "recent_size": 8}, "sink_size"),
        ({"sink_size": 4, "recent_size": 2.5}, "recent_size"),
        ({"sink_size": 0, "recent_size": 0}, "positive"),
    ],
)
def test_bad_configs_are_rejected(tmp_path, config, message):
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\t0.5\n")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PatternError, match=message):
        load_attn_pattern(tmp_path)


def test_missing_pattern_is_reported(tmp_path):
    with pytest.raises(PatternError, match="not found"):
        load_attn_pattern(tmp_path / "nope")
    with pytest.raises(PatternError, match="full_attention_heads.tsv"):
        load_attn_pattern(tmp_path)


def test_sparsify_by_sparsity_ranks_globally_and_keeps_input():
    gates = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    copy = gates.copy()
    mask, actual = sparsify_attention_heads(gates, sparsity=0.5)
    np.testing.assert_array_equal(mask, [[True, False, True], [False, True, False]])
    assert actual == 0.5
    np.testing.assert_array_equal(gates, copy)


def test_sparsify_ties_are_broken_by_head_order():
    gates = np.full((2, 2), 0.5)
    mask, actual = sparsify_attention_heads(gates, sparsity=0.25)
    np.testing.assert_array_equal(mask, [[False, True], [True, True]])
    assert actual == 0.25
    again, _ = sparsify_attention_heads(gates, sparsity=0.25)
    np.testing.assert_array_equal(mask, again)


@pytest.mark.parametrize("sparsity, streaming", [(0.0, 0), (1.0, 6), (0.34, 2), (0.49, 3)])
def test_sparsify_counts(sparsity, streaming):
    mask, actual = sparsify_attention_heads(np.linspace(0, 1, 6).reshape(2, 3), sparsity=sparsity)
    assert (~mask).sum() == streaming
    assert actual == pytest.approx(streaming / 6)


def test_sparsify_by_threshold():
    mask, actual = sparsify_attention_heads(np.array([[0.2, 0.5, 0.7]]), threshold=0.5)
    np.testing.assert_array_equal(mask, [[False, True, True]])
    assert actual == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"sparsity": 0.5, "threshold": 0.5}, "exactly one"),
        ({"sparsity": 1.5}, "sparsity must be in"),
        ({"sparsity": -0.1}, "sparsity must be in"),
        ({"threshold": 2.0}, "threshold must be in"),
    ],
)
def test_sparsify_rejects_bad_arguments(kwargs, message):
    with pytest.raises(PatternError, match=message):
        sparsify_attention_heads(np.ones((2, 2)) * 0.5, **kwargs)


def test_sparsify_rejects_nan():
    with pytest.raises(PatternError, match="non-finite"):
        sparsify_attention_heads(np.array([[0.5, np.nan]]), sparsity=0.5)


def test_pattern_must_fit_the_model():
    check_pattern_fits(np.ones((30, 3)), 30, 3)
    with pytest.raises(PatternError, match="32 layers but the model has 30"):
        check_pattern_fits(np.ones((32, 3)), 30, 3)
    with pytest.raises(PatternError, match="8 KV heads per layer but the model has 3"):
        check_pattern_fits(np.ones((30, 8)), 30, 3)


@pytest.mark.parametrize("name", ["learned-sink128-recent256", "score-sink128-recent256"])
def test_shipped_qwen_patterns_fit_the_model(name):
    """The patterns learned and scored on the H200 for Qwen2.5-Coder-0.5B (24 layers x 2 KV heads, window 128 + 256)."""
    root = Path(__file__).resolve().parents[1] / "attn_patterns" / "Qwen2.5-Coder-0.5B-Instruct" / name
    gates, sink, recent = load_attn_pattern(root)
    assert (gates.shape, sink, recent) == ((24, 2), 128, 256)
    check_pattern_fits(gates, 24, 2)
    mask, _ = sparsify_attention_heads(gates, sparsity=0.5)
    assert int(mask.sum()) == 24
