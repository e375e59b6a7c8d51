"""Synthetic long-context suite: construction, exact scoring, determinism, and an end-to-end run on a tiny model."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from helpers import CHAT_TEMPLATE, byte_level_tokenizer, tiny_llama
from transformers import PreTrainedTokenizerFast

from duo_attn.eval import synthetic as syn
from duo_attn.eval.synthetic import string_match_all

HAYSTACK = (
    "Bees visit many flowers in one morning. Their wings beat very fast! Why do they dance? "
    "They tell the hive where food can be found."
)
LENGTH = 1000
# the prompt stops short of the target by less than one filler unit plus a needle (about 40 tokens here)
TOLERANCE = 80
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Numbers and made-up words split into a few tokens."""
    tokenizer = byte_level_tokenizer([*syn.FILLER_SENTENCES, HAYSTACK, "The special number for is VAR"], 500)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer()


@pytest.mark.parametrize("task", syn.SYNTHETIC_TASKS)
def test_sample_answers_in_context_and_length(tokenizer, task):
    sample = syn.make_sample(task, tokenizer, LENGTH)
    assert sample.task == task and sample.target_length == LENGTH
    assert LENGTH - TOLERANCE <= len(sample.input_ids) <= LENGTH
    assert sample.input_ids == tokenizer(sample.text, add_special_tokens=False)["input_ids"]
    context = sample.text.split("\n\n")[1]  # between the instruction and the question
    for answer in sample.answers:
        assert answer in context
    expected_count = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "vt": 5, "cwe": 10}[task]
    assert len(set(sample.answers)) == len(sample.answers) == expected_count
    # the prompt ends with the start of the answer
    assert sample.text.rstrip().endswith(("is", "are", "are:"))


def test_niah_needles(tokenizer):
    single = syn.make_sample("niah_single", tokenizer, LENGTH)
    key = re.search(r"special number for (\S+) mentioned", single.text).group(1)
    assert f"The special number for {key} is {single.answers[0]}." in single.text
    multikey = syn.make_sample("niah_multikey", tokenizer, LENGTH)
    needles = re.findall(r"The special number for (\S+) is (\d+)\.", multikey.text)
    assert len({k for k, _ in needles}) == 4  # four different keys, one asked
    asked = re.search(r"special number for (\S+) mentioned", multikey.text).group(1)
    assert dict(needles)[asked] == multikey.answers[0]
    multivalue = syn.make_sample("niah_multivalue", tokenizer, LENGTH)
    needles = re.findall(r"The special number for (\S+) is (\d+)\.", multivalue.text)
    assert {k for k, _ in needles} == {re.search(r"numbers for (\S+) mentioned", multivalue.text).group(1)}
    assert sorted(v for _, v in needles) == sorted(multivalue.answers)


def test_vt_chain_resolves_to_answers(tokenizer):
    sample = syn.make_sample("vt", tokenizer, LENGTH)
    values: dict[str, str] = {}
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.text):
        # statements appear in assignment order, so every source is already known
        values[name] = values[source[4:]] if source.startswith("VAR ") else source
    asked = re.search(r"assigned the value (\d+) in", sample.text).group(1)
    assert len(values) == 10  # the asked chain and a distractor chain, five variables each
    assert sorted(n for n, v in values.items() if v == asked) == sorted(sample.answers)


def test_cwe_common_words_dominate(tokenizer):
    sample = syn.make_sample("cwe", tokenizer, LENGTH)
    words = re.findall(r"^\d+\. (\w+)$", sample.text, flags=re.M)
    counts = Counter(words)
    top = {word for word, _ in counts.most_common(10)}
    assert top == set(sample.answers)
    assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in top)


def test_chat_template_and_custom_haystack():
    tokenizer = _tiny_tokenizer(chat=True)
    sample = syn.make_sample("niah_single", tokenizer, LENGTH, haystack=HAYSTACK)
    assert sample.text.startswith("<|user|>Some special numbers")
    assert "<|assistant|>The special number for" in sample.text
    # the short haystack is cycled to fill the length; no generic filler is used
    assert sample.text.count("Why do they dance?") > 3
    assert syn.FILLER_SENTENCES[0] not in sample.text
    assert LENGTH - TOLERANCE <= len(sample.input_ids) <= LENGTH


def test_deterministic(tokenizer):
    first = syn.make_samples("niah_multikey", tokenizer, 600, 2, seed=3)
    again = syn.make_samples("niah_multikey", tokenizer, 600, 2, seed=3)
    assert first == again
    assert first[0].answers != first[1].answers
    assert syn.make_sample("niah_multikey", tokenizer, 600, seed=4).answers != first[0].answers


def test_scoring_is_exact():
    # 2 of 3 expected strings are present -> 2/3
    assert syn.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert syn.string_match_all("vars: abcde, FGHIJ", ["ABCDE", "fghij"]) == 1.0  # case-insensitive
    assert syn.string_match_all("", ["x"]) == 0.0
    assert syn.string_match_part("only 7654321", ["1234567", "7654321"]) == 1.0
    assert syn.string_match_part("none", ["1234567", "7654321"]) == 0.0
    sample = syn.SyntheticSample("niah_multivalue", 10, [0], "", ["11", "22", "33", "44"])
    assert sample.score("11, 22 and 44") == 0.75


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown synthetic task"):
        syn.make_sample("qa", tokenizer, LENGTH)
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        syn.make_sample("vt", tokenizer, 50)
    with pytest.raises(ValueError, match="too short for the cwe"):
        syn.make_sample("cwe", tokenizer, 60)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        syn.run_synthetic_suite(None, tokenizer, [LENGTH], tasks=["niah_single", "qa"])


def test_runner_end_to_end(tokenizer):
    model = tiny_llama(len(tokenizer))
    results = syn.run_synthetic_suite(model, tokenizer, [500, 700], n_samples=2, max_new_tokens=3, chunk_size=128)
    assert list(results) == list(syn.SYNTHETIC_TASKS)
    for scores in results.values():
        assert list(scores) == [500, 700]
        assert all(0.0 <= score <= 100.0 for score in scores.values())
    table = syn.format_synthetic_table(results)
    lines = table.strip().splitlines()
    assert lines[0] == "| task | 500 | 700 |"
    assert len(lines) == 2 + len(syn.SYNTHETIC_TASKS) + 1 and lines[-1].startswith("| **average** |")


def test_table_format_hand_made():
    table = syn.format_synthetic_table({"niah_single": {1000: 100.0, 2000: 50.0}, "vt": {1000: 0.0, 2000: 25.0}})
    assert "| niah_single | 100.00 | 50.00 |" in table
    assert "| vt | 0.00 | 25.00 |" in table
    assert "| **average** | 50.00 | 37.50 |" in table


def test_report_of_a_run_cut_short(tmp_path):
    import numpy as np

    from duo_attn.eval.harness import Method

    methods = [Method("full", "full", None, 4, 8), Method("streaming", "streaming", np.zeros((2, 2), bool), 4, 8)]
    results = {"full": {"niah_single": {500: 100.0}, "vt": {}}, "streaming": {"niah_single": {}, "vt": {}}}
    syn.write_synthetic_report(tmp_path, {"entries_planned": 4, "entries_done": 1}, methods, results)
    text = (tmp_path / "summary.md").read_text()
    assert "stopped the run after 1 of 4" in text and "not run (time limit)" in text
    assert "| vt | - |" in text and "| **average** | - |" in text  # no average over half the tasks


def test_runner_records_every_sample(tokenizer):
    model = tiny_llama(len(tokenizer))
    records: list[dict] = []
    results = syn.run_synthetic_suite(
        model, tokenizer, [500], ["niah_single", "vt"], n_samples=2, max_new_tokens=3, chunk_size=128, records=records
    )  # fmt: skip
    assert [(r["task"], r["index"]) for r in records] == [("niah_single", 0), ("niah_single", 1), ("vt", 0), ("vt", 1)]
    samples = syn.make_samples("vt", tokenizer, 500, 2)
    assert [r["answers"] for r in records[2:]] == [s.answers for s in samples]
    assert [r["prompt_tokens"] for r in records[2:]] == [len(s.input_ids) for s in samples]
    for record in records:
        assert record["score"] == string_match_all(record["prediction"], record["answers"]) and record["seconds"] > 0
    for task in ("niah_single", "vt"):
        scores = [r["score"] for r in records if r["task"] == task]
        assert results[task][500] == round(100 * sum(scores) / 2, 2)


def test_chunked_greedy_prefills_eagerly_and_gives_generates_tokens(tokenizer):
    """Where generate compiles (here: forced on the CPU), its own ``prefill_chunk_size`` compiles the pre-fill and
    traces it again for every new prompt length; the suite's decoding pre-fills eagerly into the model's cache and
    lets generate continue it: nothing is compiled, and the tokens are those of generate's chunked pre-fill."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from duo_attn import enable_duo_attention_eval
    from duo_attn.eval.harness import generate_greedy

    model = tiny_llama(len(tokenizer))
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    enable_duo_attention_eval(model, np.eye(*shape), sink_size=4, recent_size=8)
    ids = syn.make_sample("niah_single", tokenizer, 300).input_ids
    eager = model.generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, prefill_chunk_size=64, disable_compile=True,
        pad_token_id=0, eos_token_id=[],
    )[0, len(ids) :]  # fmt: skip
    model.generation_config.compile_config = CompileConfig(backend="eager")
    model.generation_config.compile_config._compile_all_devices = True
    graphs = counters["stats"]["unique_graphs"]
    assert generate_greedy(model, tokenizer, ids, 6, chunk_size=64) == tokenizer.decode(eager, skip_special_tokens=True)
    assert counters["stats"]["unique_graphs"] == graphs


def _records(scores: dict[str, list[float]]) -> list[dict]:
    return [{"task": t, "length": 100, "index": i, "score": s} for t, values in scores.items() for i, s in enumerate(values)]


def test_paired_difference_by_hand(tmp_path):
    import json

    from duo_attn.eval.compare import main, paired_difference

    a = _records({"vt": [1.0, 1.0, 0.0, 1.0], "cwe": [0.5, 0.5, 0.5, 0.5]})
    same = paired_difference(a, a)
    assert (same["mean"], same["low"], same["high"], same["better"], same["worse"]) == (0.0, 0.0, 0.0, 0, 0)
    b = _records({"vt": [0.0, 1.0, 0.0, 0.0], "cwe": [0.5, 0.0, 0.5, 0.5]})
    result = paired_difference(a, b)
    assert result["mean"] == pytest.approx(100 * (0.5 + 0.125) / 2)  # the mean over tasks of the mean difference
    assert 0.0 <= result["low"] <= result["mean"] <= result["high"] <= 100 * (0.75 + 0.5) / 2
    assert (result["better"], result["worse"], result["samples"]) == (3, 0, 8)
    assert paired_difference(b, a)["mean"] == -result["mean"]
    with pytest.raises(ValueError, match="same"):
        paired_difference(a, a[:-1])
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"samples": {"x": a, "y": b}}))
    assert main([f"{path}:x", f"{path}:y", "--resamples", "200"])["mean"] == result["mean"]
    with pytest.raises(SystemExit, match="no method 'z'"):
        main([f"{path}:z", f"{path}:y"])
