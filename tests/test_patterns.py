import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from duo_attn.patterns import (
    PatternError,
    check_pattern_fits,
    check_retrieval_floor,
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


# 3 layers x 2 KV heads; ranked globally, half the heads streaming empties layer 1 (gates 0.1 and 0.2)
FLOOR_GATES = np.array([[0.9, 0.8], [0.1, 0.2], [0.3, 0.05]])


def _old_sparsify(gates: np.ndarray, sparsity: float) -> np.ndarray:
    """The global ranking as it was before the floor: the reference min_retrieval_per_layer=0 must reproduce."""
    flat = gates.ravel()
    order = np.lexsort((np.arange(flat.size), flat))
    mask = np.ones(flat.size, dtype=bool)
    mask[order[: int(round(sparsity * flat.size))]] = False
    return mask.reshape(gates.shape)


def test_floor_keeps_each_layers_best_head_at_the_same_sparsity():
    np.testing.assert_array_equal(
        sparsify_attention_heads(FLOOR_GATES, sparsity=0.5)[0], [[True, True], [False, False], [True, False]]
    )
    mask, actual = sparsify_attention_heads(FLOOR_GATES, sparsity=0.5, min_retrieval_per_layer=1)
    # layer 1 keeps 0.2; the next lowest gate outside the floor (0.8 in layer 0) goes streaming instead
    np.testing.assert_array_equal(mask, [[True, False], [False, True], [True, False]])
    assert actual == 0.5
    mask, actual = sparsify_attention_heads(FLOOR_GATES, sparsity=1 / 3, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(mask, [[True, True], [False, True], [True, False]])  # the floor is not needed
    assert actual == pytest.approx(1 / 3)
    mask, _ = sparsify_attention_heads(FLOOR_GATES, sparsity=0.0, min_retrieval_per_layer=2)
    assert mask.all()


def test_floor_with_a_threshold_adds_each_layers_best_heads():
    np.testing.assert_array_equal(
        sparsify_attention_heads(FLOOR_GATES, threshold=0.5)[0], [[True, True], [False, False], [False, False]]
    )
    mask, actual = sparsify_attention_heads(FLOOR_GATES, threshold=0.5, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(mask, [[True, True], [False, True], [True, False]])
    assert actual == pytest.approx(1 / 3)
    mask, _ = sparsify_attention_heads(FLOOR_GATES, threshold=0.5, min_retrieval_per_layer=2)
    assert mask.all()


def test_floor_ties_are_broken_by_head_order():
    """Among equal gates the earlier head goes streaming first, so each layer keeps its later one."""
    gates = np.full((2, 2), 0.5)
    np.testing.assert_array_equal(sparsify_attention_heads(gates, sparsity=0.5)[0], [[False, False], [True, True]])
    mask, _ = sparsify_attention_heads(gates, sparsity=0.5, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(mask, [[False, True], [False, True]])
    mask, _ = sparsify_attention_heads(gates, threshold=0.6, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(mask, [[False, True], [False, True]])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(24, 2), (6, 4), (1, 3)])
def test_floor_zero_is_the_global_ranking(seed, shape):
    rng = np.random.default_rng(seed)
    gates = np.round(rng.random(shape), 1)  # rounded: many ties
    for sparsity in (0.0, 0.25, 0.5, 0.77, 1.0):
        old = _old_sparsify(gates, sparsity)
        np.testing.assert_array_equal(sparsify_attention_heads(gates, sparsity=sparsity)[0], old)
        np.testing.assert_array_equal(sparsify_attention_heads(gates, sparsity=sparsity, min_retrieval_per_layer=0)[0],
                                      old)  # fmt: skip
    np.testing.assert_array_equal(sparsify_attention_heads(gates, threshold=0.5, min_retrieval_per_layer=0)[0],
                                  gates >= 0.5)  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape, floor", [((24, 2), 1), ((6, 4), 1), ((6, 4), 3), ((5, 3), 2)])
def test_floor_holds_in_every_layer_and_sparsity_is_unchanged(seed, shape, floor):
    rng = np.random.default_rng(seed)
    gates = np.round(rng.random(shape), 1)
    layers, heads = shape
    kept = np.zeros(shape, dtype=bool)  # each layer's best `floor` heads; of equal gates, the later head
    for layer, row in enumerate(gates):
        kept[layer, np.lexsort((np.arange(heads), row))[heads - floor :]] = True
    for sparsity in np.linspace(0, 1, 11):
        n_streaming = int(round(sparsity * gates.size))
        if n_streaming > gates.size - layers * floor:
            with pytest.raises(PatternError, match="leaving at most"):
                sparsify_attention_heads(gates, sparsity=sparsity, min_retrieval_per_layer=floor)
            continue
        mask, actual = sparsify_attention_heads(gates, sparsity=sparsity, min_retrieval_per_layer=floor)
        assert (mask.sum(axis=1) >= floor).all()
        assert (~mask).sum() == n_streaming and actual == pytest.approx(n_streaming / gates.size)
        assert mask[kept].all()
        if (~mask).any() and (mask & ~kept).any():
            assert gates[~mask].max() <= gates[mask & ~kept].min()  # the lowest of the other heads went streaming


def test_an_impossible_floor_is_refused_and_changes_nothing():
    gates = FLOOR_GATES.copy()
    with pytest.raises(PatternError, match=r"sparsity 0\.6 makes 4 of 6 .* min_retrieval_per_layer=1 keeps 1 of 2 "
                                           r"heads in each of 3 layers, leaving at most 3 streaming heads"):
        sparsify_attention_heads(gates, sparsity=0.6, min_retrieval_per_layer=1)
    with pytest.raises(PatternError, match="makes 1 of 6 .* leaving at most 0"):
        sparsify_attention_heads(gates, sparsity=0.1, min_retrieval_per_layer=2)
    np.testing.assert_array_equal(gates, FLOOR_GATES)


@pytest.mark.parametrize(
    "floor, message",
    [
        (-1, "must be >= 0, got -1"),
        (3, "min_retrieval_per_layer=3 is more than the pattern's 2 KV heads per layer"),
        (1.0, "must be an integer, got float 1.0"),
        (True, "must be an integer, got bool True"),
        ("1", "must be an integer, got str '1'"),
        (None, "must be an integer, got NoneType None"),
    ],
)
def test_bad_floors_are_refused(floor, message):
    for kwargs in ({"sparsity": 0.5}, {"threshold": 0.5}):
        with pytest.raises(PatternError, match=message):
            sparsify_attention_heads(FLOOR_GATES, **kwargs, min_retrieval_per_layer=floor)


def test_a_numpy_integer_floor_is_accepted():
    mask, _ = sparsify_attention_heads(FLOOR_GATES, sparsity=0.5, min_retrieval_per_layer=np.int64(1))
    assert (mask.sum(axis=1) == 1).all()


def test_a_mask_below_the_floor_is_refused():
    check_retrieval_floor(np.array([[1, 0], [0, 1]]), 1)
    check_retrieval_floor(np.zeros((2, 2)), 0)
    with pytest.raises(PatternError, match=r"fewer than min_retrieval_per_layer=1 retrieval heads in layer\(s\) 1, 2"):
        check_retrieval_floor(np.array([[1, 0], [0, 0], [0, 0]]), 1)
    with pytest.raises(PatternError, match="more than the pattern's 2 KV heads"):
        check_retrieval_floor(np.ones((2, 2)), 3)


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
    floored, _ = sparsify_attention_heads(gates, sparsity=0.5, min_retrieval_per_layer=1)
    assert int(floored.sum()) == 24 and (floored.sum(axis=1) == 1).all()  # without the floor some layers keep none
