"""The scoring primitive, the NIAH grid and the passkey grid, on a tiny random model with a tiny offline tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import byte_level_tokenizer
from transformers import DynamicCache, PreTrainedTokenizerFast

from duo_attn import DuoCache, PatternError, disable_duo_attention, enable_duo_attention_eval, save_attn_pattern
from duo_attn.learn.data import NeedlePrompt
from duo_attn.learn.haystack import encode_haystack, load_haystack
from duo_attn.eval import niah, passkey_grid, synthetic
from duo_attn.eval.harness import build_methods, key_only, kv_bytes, new_cache, prefill, run_grid, score_answer
from duo_attn.eval.report import write_report
from duo_attn.models import tiny_model
from duo_attn.patterns import sparsify_attention_heads

SINK, RECENT = 4, 8
# tiny_model: 2 layers, 2 KV heads of dim 16, fp32.
LAYERS, KV_HEADS, HEAD_DIM, FP32 = 2, 2, 16, 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """ChatML, trained on the default haystack (as tests/test_data.py does)."""
    return byte_level_tokenizer([load_haystack(max_chars=20_000)], 600, chatml=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


def _prompt(length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 600, (length,), generator=torch.Generator().manual_seed(seed))


def _greedy_continuation(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(prompt[None], max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, prompt.numel()))
    return out[0, prompt.numel() :]


# ------------------------------------------------------------------------------------------ scoring primitive


@pytest.mark.parametrize("chunk_size", [1024, 16])
def test_own_greedy_answer_scores_perfectly(model, tokenizer, chunk_size: int):
    prompt = _prompt()
    answer = _greedy_continuation(model, prompt, 6)
    score = score_answer(model, tokenizer, prompt, answer, chunk_size=chunk_size, extra_new_tokens=3)
    assert score.teacher_forced_accuracy == 1.0
    assert score.greedy_match
    assert score.seconds >= score.prefill_seconds > 0
    assert score.kv_bytes == LAYERS * 2 * KV_HEADS * prompt.numel() * HEAD_DIM * FP32


def test_wrong_answer_scores_low(model, tokenizer):
    prompt = _prompt()
    answer = _greedy_continuation(model, prompt, 6)
    wrong = (answer + 1) % len(tokenizer)
    score = score_answer(model, tokenizer, prompt, wrong, answer="this text is never generated")
    assert score.teacher_forced_accuracy < 1.0 and not score.greedy_match


def test_duo_with_every_head_retrieval_scores_identically(model, tokenizer):
    prompt = _prompt(seed=1)
    answer = _greedy_continuation(model, prompt, 5)
    full = score_answer(model, tokenizer, prompt, answer, chunk_size=16)
    enable_duo_attention_eval(model, np.ones((LAYERS, KV_HEADS)), sink_size=SINK, recent_size=RECENT)
    try:
        assert isinstance(new_cache(model), DuoCache)
        duo = score_answer(model, tokenizer, prompt, answer, chunk_size=16)
    finally:
        disable_duo_attention(model)
    assert isinstance(new_cache(model), DynamicCache)
    assert (duo.generated, duo.greedy_match, duo.teacher_forced_accuracy) == (
        full.generated,
        full.greedy_match,
        full.teacher_forced_accuracy,
    )
    assert duo.kv_bytes == full.kv_bytes == LAYERS * 2 * KV_HEADS * prompt.numel() * HEAD_DIM * FP32


def test_kv_bytes_of_both_cache_types(model):
    prompt = _prompt(50)
    cache = new_cache(model)
    prefill(model, prompt, cache, chunk_size=16)
    assert kv_bytes(cache) == LAYERS * 2 * KV_HEADS * 50 * HEAD_DIM * FP32
    mask = np.array([[1, 0], [0, 0]])  # one retrieval head, three streaming heads of sink + recent slots
    enable_duo_attention_eval(model, mask, sink_size=SINK, recent_size=RECENT)
    try:
        cache = new_cache(model)
        prefill(model, prompt, cache, chunk_size=16)
    finally:
        disable_duo_attention(model)
    assert kv_bytes(cache) == 2 * HEAD_DIM * FP32 * (1 * 50 + 3 * (SINK + RECENT))
    enable_duo_attention_eval(model, mask, sink_size=SINK, recent_size=RECENT, kv_quant="int8")
    try:
        cache = new_cache(model)
        prefill(model, prompt, cache, chunk_size=16)
    finally:
        disable_duo_attention(model)
    # int8 codes plus a float16 scale and zero per group of 16 channels; streaming heads stay fp32
    int8_per_token = HEAD_DIM + 2 * 2 * (HEAD_DIM // 16)
    assert kv_bytes(cache) == 2 * (1 * 50 * int8_per_token + 3 * (SINK + RECENT) * HEAD_DIM * FP32)


def test_key_only_moves_leading_whitespace_into_the_prompt(tokenizer):
    space = tokenizer.encode(" ", add_special_tokens=False)
    digits = tokenizer.encode("7491", add_special_tokens=False)
    prompt = NeedlePrompt(torch.tensor([5, 6, 7]), torch.tensor(space + digits), (0, 1))
    prompt_ids, answer_ids = key_only(tokenizer, prompt)
    assert prompt_ids.tolist() == [5, 6, 7, *space] and answer_ids.tolist() == digits
    only_space = NeedlePrompt(torch.tensor([5]), torch.tensor(space), (0, 1))
    assert key_only(tokenizer, only_space)[1].tolist() == space  # never empties the answer


def test_build_methods_masks(model):
    methods = build_methods(model.config, ["full", "random", "streaming"], sparsities=[0.25, 0.5, 1.0], random_seeds=[3])
    assert [m.name for m in methods] == ["full", "random@0.25", "random@0.50", "random@1.00", "streaming"]
    assert methods[0].retrieval_mask is None and methods[0].retrieval_fraction == 1.0
    assert [m.retrieval_mask.sum() for m in methods[1:]] == [3, 2, 0, 0]
    assert bool((methods[1].retrieval_mask >= methods[2].retrieval_mask).all())  # nested: same random gates
    again = build_methods(model.config, ["random"], sparsities=[0.5], random_seeds=[3])[0]
    assert np.array_equal(again.retrieval_mask, methods[2].retrieval_mask)
    with pytest.raises(ValueError, match="pattern"):
        build_methods(model.config, ["duo"], sparsities=[0.5])
    with pytest.raises(ValueError, match="unknown method"):
        build_methods(model.config, ["sparse"], sparsities=[0.5])


def test_build_methods_one_random_draw_per_seed(model):
    methods = build_methods(model.config, ["random"], sparsities=[0.25, 0.5], random_seeds=[3, 4], min_retrieval_per_layer=1)
    assert [m.name for m in methods] == [
        "random@0.25-floor1-seed3", "random@0.50-floor1-seed3", "random@0.25-floor1-seed4", "random@0.50-floor1-seed4",
    ]  # fmt: skip
    assert [m.source for m in methods] == ["seed 3", "seed 3", "seed 4", "seed 4"]
    alone = build_methods(model.config, ["random"], sparsities=[0.5], random_seeds=[4], min_retrieval_per_layer=1)[0]
    np.testing.assert_array_equal(alone.retrieval_mask, methods[3].retrieval_mask)  # a seed's draw is its own
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    for method, seed in zip(methods[1::2], (3, 4)):
        gates = np.random.default_rng(seed).random(shape)
        expected, _ = sparsify_attention_heads(gates, sparsity=0.5, min_retrieval_per_layer=1)
        np.testing.assert_array_equal(method.retrieval_mask, expected)
    for bad in ([], [1, 1]):
        with pytest.raises(ValueError, match="distinct"):
            build_methods(model.config, ["random"], sparsities=[0.5], random_seeds=bad)


def test_build_methods_with_a_floor_name_and_record_it(model, tmp_path: Path):
    gates = np.array([[0.9, 0.8], [0.1, 0.2]])  # ranked globally, half the heads streaming empties layer 1
    save_attn_pattern(tmp_path / "duo", gates, SINK, RECENT)
    save_attn_pattern(tmp_path / "baseline", 1.0 - gates, SINK, RECENT)
    kinds = ["full", "duo", "baseline", "random", "streaming"]
    paths = dict(pattern=tmp_path / "duo", baseline_pattern=tmp_path / "baseline")
    methods = build_methods(model.config, kinds, sparsities=[0.5], kv_quants=[None, "int4"], min_retrieval_per_layer=1,
                            **paths)  # fmt: skip
    assert [m.name for m in methods] == [
        "full", "duo@0.50-floor1", "duo@0.50-floor1+int4", "baseline@0.50-floor1", "baseline@0.50-floor1+int4",
        "random@0.50-floor1", "random@0.50-floor1+int4", "streaming",
    ]  # fmt: skip
    np.testing.assert_array_equal(methods[1].retrieval_mask, [[True, False], [False, True]])
    np.testing.assert_array_equal(methods[3].retrieval_mask, [[False, True], [True, False]])
    assert all((m.retrieval_mask.sum(axis=1) == 1).all() for m in methods[1:7])
    described = [m.describe() for m in methods]
    assert [d["min_retrieval_per_layer"] for d in described] == [0, 1, 1, 1, 1, 1, 1, 0]
    assert described[1]["retrieval_mask"] == [[1, 0], [0, 1]] and described[1]["sparsity"] == 0.5
    plain = build_methods(model.config, ["duo"], sparsities=[0.5], **paths)[0]
    assert plain.name == "duo@0.50" and plain.describe()["min_retrieval_per_layer"] == 0
    np.testing.assert_array_equal(plain.retrieval_mask, [[True, True], [False, False]])
    with pytest.raises(PatternError, match="leaving at most 0 streaming heads"):
        build_methods(model.config, ["random"], sparsities=[0.5], min_retrieval_per_layer=2)


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model, tokenizer) -> Path:
    """The tiny model, its tokenizer and a random pattern on disk, so the command lines can load them."""
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    gates = np.random.default_rng(0).random((LAYERS, KV_HEADS))
    save_attn_pattern(root / "pattern", gates, SINK, RECENT)
    save_attn_pattern(root / "baseline", 1.0 - gates, SINK, RECENT)
    return root


def _check_report(out: Path, methods: list[str], contexts: list[int], cells: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "methods", "summary", "records"}
    assert [m["name"] for m in results["methods"]] == methods
    assert len(results["records"]) == len(methods) * cells
    for record in results["records"]:
        assert 0.0 <= record["teacher_forced_accuracy"] <= 1.0 and isinstance(record["greedy_match"], bool)
        assert record["kv_bytes"] > 0 and record["seconds"] > 0
    for method in methods:
        assert set(results["summary"][method]) == {*map(str, contexts), "mean"}
        assert (out / f"heatmap_{method.replace('@', '_').replace('+', '_')}.png").stat().st_size > 1000
    markdown = (out / "summary.md").read_text()
    for method in methods:
        assert f"| {method} |" in markdown
    assert all(f"{c} tok" in markdown for c in contexts) and "MiB" in markdown
    return results


def test_niah_end_to_end(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "niah"
    paths = niah.main(
        [
            "--model", str(tiny_dir / "model"), "--contexts", "96", "128", "--depths", "0.25", "0.75",
            "--methods", "full", "duo", "random", "streaming", "--pattern", str(tiny_dir / "pattern"),
            "--sparsities", "0.5", "--chunk-size", "64", "--kv-quant", "none", "int4", "--output-dir", str(out),
        ]
    )  # fmt: skip
    methods = ["full", "duo@0.50", "duo@0.50+int4", "random@0.50", "random@0.50+int4", "streaming"]
    assert paths["json"] == out / "results.json" and len(paths["heatmaps"]) == 6
    results = _check_report(out, methods, [96, 128], cells=4)
    assert results["config"]["sink_size"] == SINK and results["config"]["recent_size"] == RECENT  # from the pattern
    assert [m["kv_quant"] for m in results["methods"]] == [None, None, "int4", None, "int4", None]
    kv = {m: s["128"]["kv_bytes"] for m, s in results["summary"].items()}
    assert kv["full"] > kv["duo@0.50"] > kv["duo@0.50+int4"] > kv["streaming"]
    assert results["records"][0]["answer"] == "7491"


def test_passkey_grid_end_to_end(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "grid"
    passkey_grid.main(
        [
            "--model", str(tiny_dir / "model"), "--contexts", "96", "--depths", "0.2", "0.8", "--keys-per-cell", "2",
            "--pattern", str(tiny_dir / "pattern"), "--baseline-pattern", str(tiny_dir / "baseline"),
            "--retrieval-fractions", "0.5", "--sink", "2", "--output-dir", str(out),
        ]
    )  # fmt: skip
    methods = ["full", "duo@0.50", "baseline@0.50", "random@0.50", "streaming"]
    results = _check_report(out, methods, [96], cells=4)
    assert results["config"]["sink_size"] == 2 and results["config"]["recent_size"] == RECENT
    duo, baseline = (np.array(results["methods"][i]["retrieval_mask"]) for i in (1, 2))
    assert not np.array_equal(duo, baseline)  # opposite gates pick the other half of the heads
    keys = [r["answer"] for r in results["records"] if r["method"] == "full"]
    assert len(set(keys)) == 4 and all(k.isdigit() and len(k) == 5 for k in keys)


def test_niah_with_a_floor_names_the_methods_and_their_heatmaps(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "niah"
    niah.main([
        "--model", str(tiny_dir / "model"), "--contexts", "96", "--depths", "0.5", "--methods", "duo", "random",
        "--pattern", str(tiny_dir / "pattern"), "--sparsities", "0.5", "--chunk-size", "64",
        "--min-retrieval-per-layer", "1", "--output-dir", str(out),
    ])  # fmt: skip
    results = _check_report(out, ["duo@0.50-floor1", "random@0.50-floor1"], [96], cells=1)
    assert (out / "heatmap_duo_0.50-floor1.png").is_file()
    assert results["config"]["min_retrieval_per_layer"] == 1
    assert all(np.array(m["retrieval_mask"]).sum(axis=1).min() >= 1 for m in results["methods"])


def test_the_eval_commands_refuse_a_negative_floor(capsys):
    for main in (niah.main, passkey_grid.main, synthetic.main):
        with pytest.raises(SystemExit):
            main(["--min-retrieval-per-layer", "-1"])
        assert "expected a non-negative integer, got -1" in capsys.readouterr().err


def test_a_grid_cut_short_reports_what_it_scored(model, tokenizer, tmp_path: Path):
    hay = encode_haystack(tokenizer, load_haystack(max_chars=5000))
    cells = niah.needle_cells(tokenizer, hay, [96, 80], [0.5])
    methods = build_methods(model.config, ["full", "streaming"], sink_size=SINK, recent_size=RECENT)
    assert run_grid(model, tokenizer, methods, cells, chunk_size=64, deadline=time.perf_counter()) == []
    records = run_grid(model, tokenizer, methods, cells, chunk_size=64)
    assert [(r["method"], r["context_length"]) for r in records] == [("full", 96), ("streaming", 96), ("full", 80),
                                                                     ("streaming", 80)]  # fmt: skip
    paths = write_report(tmp_path, "cut", {}, methods, records[:1], planned=len(records))
    assert "stopped the run after 1 of 4 cells" in paths["markdown"].read_text()
    assert [p.name for p in paths["heatmaps"]] == ["heatmap_full.png"]  # streaming scored nothing
    assert json.loads(paths["json"].read_text())["config"] == {"cells_planned": 4, "cells_done": 1}


def test_passkeys_are_deterministic_and_held_out(tokenizer):
    first = passkey_grid.draw_passkeys(0, 1024, 0.5, 4)
    assert first == passkey_grid.draw_passkeys(0, 1024, 0.5, 4)
    assert first != passkey_grid.draw_passkeys(1, 1024, 0.5, 4)
    assert len({k for k, _ in first}) == 4
    hay = encode_haystack(tokenizer, load_haystack(max_chars=5000))
    cells = passkey_grid.passkey_cells(tokenizer, hay, [120], [0.5], keys_per_cell=2)
    for cell in cells:
        text = tokenizer.decode(cell.prompt_ids.tolist())
        assert f"The pass key is {cell.answer}. Remember it." in text and text.rstrip().endswith("The pass key is")
        assert tokenizer.decode(cell.answer_ids.tolist()).strip() == cell.answer
