"""Synthetic long-context data: haystack text, multi-passkey training samples, needle prompts.

DuoAttention learns which heads must see the whole context by asking the model to recall
passkeys hidden at random depths of a long filler text (the "haystack"). Every sample is
assembled from separately tokenized pieces, so the token span of every passkey and answer
is known exactly rather than recovered by searching decoded text.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

PasskeyKind = Literal["digits", "words"]

PASSKEY_WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle",
    "garden", "rocket", "silver", "forest", "window", "yellow", "button", "dragon",
    "island", "marble", "orange", "pepper", "rabbit", "saddle", "tunnel", "violin",
    "wagon", "anchor", "bridge", "carpet", "desert", "engine", "falcon", "glacier",
    "harbor", "jacket", "kettle", "ladder", "meadow", "needle", "oyster", "parrot",
    "quartz", "ribbon", "shadow", "turtle", "velvet", "walnut", "zebra", "beacon",
    "copper", "domino", "feather", "goblet", "hammer", "iceberg", "jungle", "lantern",
    "mirror", "nutmeg", "orchid", "pillow", "rubber", "summit", "timber", "valley",
)  # fmt: skip


# --------------------------------------------------------------------------- haystacks


def _default_haystack() -> str:
    """Python's own documentation topics: offline, ships with every interpreter."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def _jsonl_texts(lines: Iterator[str], path: Path, text_field: str) -> Iterator[str]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}: line {number} has no string field {text_field!r}")
        yield record[text_field]


def _take(texts: Iterator[str], max_chars: int | None) -> str:
    """Join documents, stopping as soon as ``max_chars`` are collected (huge corpora)."""
    parts: list[str] = []
    size = 0
    for text in texts:
        parts.append(text)
        size += len(text) + 2
        if max_chars is not None and size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def load_haystack(
    source: str | Path | None = None,
    *,
    text_field: str = "text",
    max_chars: int | None = None,
) -> str:
    """Return filler text for long contexts.

    ``source`` is a ``.txt`` file, a ``.jsonl`` file (one JSON object per line, documents
    in ``text_field``), a zstandard-compressed ``.jsonl.zst`` (the booksum format, read as
    a stream), or ``None`` for the offline default (``pydoc_data.topics``, ~465k chars).
    ``max_chars`` stops reading early, so a multi-GB corpus costs only what is used.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if source is None:
        return _default_haystack()[:max_chars]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"haystack file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"haystack source {path} is not a file")
    name = path.name.lower()
    try:
        if name.endswith(".jsonl.zst"):
            text = _read_jsonl_zst(path, text_field, max_chars)
        elif name.endswith(".jsonl"):
            with path.open(encoding="utf-8") as handle:
                text = _take(_jsonl_texts(handle, path, text_field), max_chars)
        elif name.endswith(".txt"):
            with path.open(encoding="utf-8") as handle:
                text = handle.read(-1 if max_chars is None else max_chars)
        else:
            raise ValueError(f"haystack file {path}: unsupported format, expected .txt, .jsonl or .jsonl.zst")
    except UnicodeDecodeError as error:
        raise ValueError(f"haystack file {path} is not valid UTF-8 text ({error})") from error
    if not text.strip():
        raise ValueError(f"haystack file {path} contains no text")
    return text


def _read_jsonl_zst(path: Path, text_field: str, max_chars: int | None) -> str:
    try:
        import zstandard
    except ImportError as error:
        raise ImportError("reading .jsonl.zst needs `pip install zstandard` (duo-attn[train])") from error
    try:
        with path.open("rb") as raw:
            # Large windows: corpora like booksum are compressed with --long.
            reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(raw)
            with io.TextIOWrapper(reader, encoding="utf-8") as lines:
                return _take(_jsonl_texts(lines, path, text_field), max_chars)
    except zstandard.ZstdError as error:
        raise ValueError(f"haystack file {path} is not valid zstandard data ({error})") from error


def encode_haystack(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenize the haystack once; every sample cuts its filler from this stream."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise ValueError("the haystack tokenizes to no tokens")
    return list(ids)


# ------------------------------------------------------------------- tokenizing pieces

_ANCHOR = "\n"
_USER_SENTINEL = "\x1eDUO_USER\x1e"
_ASSISTANT_SENTINEL = "\x1eDUO_ASSISTANT\x1e"


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokens of ``text`` as it reads in mid-document.

    Encoding after a newline anchor and dropping the anchor's tokens avoids the spurious
    word-start marker sentencepiece tokenizers put at the start of every encode call.
    Falls back to a plain encode when the anchor merges with the text.
    """
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    ids = tokenizer.encode(_ANCHOR + text, add_special_tokens=False)
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor) :]
    return tokenizer.encode(text, add_special_tokens=False)


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens the tokenizer itself puts before text (a BOS for Llama-style tokenizers)."""
    bare = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x", add_special_tokens=True)
    cut = len(full) - len(bare)
    return full[:cut] if full[cut:] == bare else []


@dataclass(frozen=True)
class _Frame:
    """Token ids around the user text and the assistant text of one exchange."""

    before_user: list[int]
    user_to_assistant: list[int]
    after_assistant: list[int]


def _frame(tokenizer: PreTrainedTokenizerBase, *, generation: bool) -> _Frame:
    """Split the chat template around sentinel messages; plain text when there is none.

    ``generation`` renders the prompt as the model sees it before answering (generation
    prompt, no closing turn); otherwise the full exchange, as for training.
    """
    if not tokenizer.chat_template:
        return _Frame(_special_prefix(tokenizer), _encode(tokenizer, "\n"), [])
    messages = [{"role": "user", "content": _USER_SENTINEL}]
    if not generation:
        messages.append({"role": "assistant", "content": _ASSISTANT_SENTINEL})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    before, user_found, rest = rendered.partition(_USER_SENTINEL)
    if generation:
        middle, after = rest, ""
    else:
        middle, assistant_found, after = rest.partition(_ASSISTANT_SENTINEL)
        user_found = user_found and assistant_found
    if not user_found:
        raise ValueError("the tokenizer's chat template does not reproduce message contents verbatim")

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    return _Frame(ids(before), ids(middle), ids(after))


def _filler(haystack_ids: Sequence[int], start: int, count: int) -> list[int]:
    """``count`` haystack tokens from ``start`` (modulo its length), wrapping around."""
    if not haystack_ids:
        raise ValueError("the haystack is empty")
    out: list[int] = []
    position = start % len(haystack_ids)
    while len(out) < count:
        out.extend(haystack_ids[position : position + count - len(out)])
        position = 0
    return out


# ----------------------------------------------------------------- passkey samples


@dataclass(frozen=True)
class PasskeySample:
    """One training sequence and where everything in it is.

    Spans are half-open ``(start, end)`` token indices into ``input_ids``. ``labels``
    equals ``input_ids`` on the answer spans and is ``-100`` elsewhere (HF causal-LM
    convention: the model shifts labels itself).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    passkeys: list[str]
    passkey_spans: list[tuple[int, int]]  # the passkey inside its needle in the context
    depths: list[float]  # needle position as a fraction of the filler, sorted
    answer_spans: list[tuple[int, int]]  # whole supervised answer sentence per passkey
    answer_passkey_spans: list[tuple[int, int]]  # the passkey inside each answer sentence


def _draw_passkeys(rng: random.Random, count: int, kind: PasskeyKind, length: int) -> list[str]:
    passkeys: list[str] = []
    while len(passkeys) < count:
        if kind == "digits":
            key = rng.choice("123456789") + "".join(rng.choices("0123456789", k=length - 1))
        else:
            key = " ".join(rng.choices(PASSKEY_WORDS, k=length))
        if key not in passkeys:  # distinct, so each question has one right answer
            passkeys.append(key)
    return passkeys


def _check_passkey_options(num_passkeys: int, kind: str, length: int, min_depth: float, max_depth: float) -> None:
    if num_passkeys < 1:
        raise ValueError(f"num_passkeys must be >= 1, got {num_passkeys}")
    if kind not in ("digits", "words"):
        raise ValueError(f"passkey_kind must be 'digits' or 'words', got {kind!r}")
    if length < 1:
        raise ValueError(f"passkey_length must be >= 1, got {length}")
    if not 0.0 <= min_depth <= max_depth <= 1.0:
        raise ValueError(f"need 0 <= min_depth <= max_depth <= 1, got {min_depth}, {max_depth}")


def build_passkey_sample(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: Sequence[int],
    context_length: int,
    rng: random.Random,
    *,
    num_passkeys: int = 10,
    passkey_kind: PasskeyKind = "digits",
    passkey_length: int = 5,
    min_depth: float = 0.05,
    max_depth: float = 0.95,
) -> PasskeySample:
    """Build one multi-passkey sample of exactly ``context_length`` tokens.

    Needles ("The pass key number 3 is 71432. Remember it.") sit at sorted random depths
    in haystack filler; questions for every key follow, then the answers ("The pass key
    number 3 is 71432."), which are the only supervised tokens. With a chat template the
    context and questions form the user turn and the answers the assistant turn.
    """
    _check_passkey_options(num_passkeys, passkey_kind, passkey_length, min_depth, max_depth)
    passkeys = _draw_passkeys(rng, num_passkeys, passkey_kind, passkey_length)
    depths = sorted(rng.uniform(min_depth, max_depth) for _ in passkeys)
    frame = _frame(tokenizer, generation=False)
    numbers = range(1, num_passkeys + 1)
    key_pieces = [_encode(tokenizer, f" {key}") for key in passkeys]

    # (before the key, the key, after the key) for each needle and each answer sentence.
    needles = [
        (_encode(tokenizer, f"\nThe pass key number {n} is"), key_ids, _encode(tokenizer, ". Remember it.\n"))
        for n, key_ids in zip(numbers, key_pieces)
    ]
    questions = _encode(tokenizer, "\n\n" + " ".join(f"What is the pass key number {n}?" for n in numbers))
    answers = [
        (_encode(tokenizer, f"{'' if n == 1 else ' '}The pass key number {n} is"), key_ids, _encode(tokenizer, "."))
        for n, key_ids in zip(numbers, key_pieces)
    ]

    pieces = [frame.before_user, frame.user_to_assistant, frame.after_assistant, questions]
    fixed = sum(map(len, pieces)) + sum(len(piece) for parts in needles + answers for piece in parts)
    budget = context_length - fixed
    if budget < 0:
        raise ValueError(
            f"context_length {context_length} is too short for {num_passkeys} passkeys: "
            f"the needles, questions and answers alone take {fixed} tokens"
        )
    filler = _filler(haystack_ids, rng.getrandbits(32), budget)

    ids = list(frame.before_user)
    passkey_spans: list[tuple[int, int]] = []
    cursor = 0
    for depth, (head, key, tail) in zip(depths, needles):
        cut = round(depth * budget)
        ids += filler[cursor:cut] + head
        passkey_spans.append((len(ids), len(ids) + len(key)))
        ids += key + tail
        cursor = cut
    ids += filler[cursor:] + questions + frame.user_to_assistant

    answer_spans: list[tuple[int, int]] = []
    answer_passkey_spans: list[tuple[int, int]] = []
    for head, key, tail in answers:
        start = len(ids)
        ids += head
        answer_passkey_spans.append((len(ids), len(ids) + len(key)))
        ids += key + tail
        answer_spans.append((start, len(ids)))
    ids += frame.after_assistant

    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in answer_spans:
        labels[start:end] = input_ids[start:end]
    return PasskeySample(input_ids, labels, passkeys, passkey_spans, depths, answer_spans, answer_passkey_spans)


def context_length_choices(min_length: int, max_length: int, num_intervals: int) -> list[int]:
    """``num_intervals`` evenly spaced lengths from ``min_length`` to ``max_length``
    inclusive, so training sees short and long contexts alike."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    if num_intervals < 1 or (num_intervals == 1 and min_length != max_length):
        raise ValueError(f"num_intervals must be >= 2 (or 1 when min == max), got {num_intervals}")
    if num_intervals == 1:
        return [min_length]
    step = (max_length - min_length) / (num_intervals - 1)
    return sorted({round(min_length + i * step) for i in range(num_intervals)})


class PasskeyDataset(Dataset):
    """A fixed-length stream of passkey samples; ``dataset[i]`` depends only on
    ``(seed, i)``, so a resumed training run sees exactly the same data."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        haystack_ids: Sequence[int],
        *,
        seed: int = 0,
        num_samples: int = 2000,
        num_passkeys: int = 10,
        passkey_kind: PasskeyKind = "digits",
        passkey_length: int = 5,
        min_context: int = 1024,
        max_context: int = 8192,
        num_intervals: int = 8,
        min_depth: float = 0.05,
        max_depth: float = 0.95,
    ) -> None:
        _check_passkey_options(num_passkeys, passkey_kind, passkey_length, min_depth, max_depth)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.tokenizer = tokenizer
        self.haystack_ids = list(haystack_ids)
        self.seed = seed
        self.num_samples = num_samples
        self.context_lengths = context_length_choices(min_context, max_context, num_intervals)
        self.num_passkeys = num_passkeys
        self.passkey_kind = passkey_kind
        self.passkey_length = passkey_length
        self.min_depth = min_depth
        self.max_depth = max_depth

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> PasskeySample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        # A string seed is hashed with SHA-512: stable across processes and Python runs.
        rng = random.Random(f"duo-attn-passkey:{self.seed}:{index}")
        return build_passkey_sample(
            self.tokenizer,
            self.haystack_ids,
            rng.choice(self.context_lengths),
            rng,
            num_passkeys=self.num_passkeys,
            passkey_kind=self.passkey_kind,
            passkey_length=self.passkey_length,
            min_depth=self.min_depth,
            max_depth=self.max_depth,
        )


# ------------------------------------------------------------------- needle prompts


@dataclass(frozen=True)
class NeedlePrompt:
    """A needle-in-a-haystack prompt of exactly ``context_length`` tokens that ends
    where the answer starts, and the answer's ids for teacher forcing."""

    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    needle_span: tuple[int, int]  # half-open span of the needle in prompt_ids


def build_needle_prompt(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: Sequence[int],
    context_length: int,
    depth_ratio: float,
    needle: str,
    question: str,
    answer_prefix: str = "",
    *,
    answer: str | None = None,
) -> NeedlePrompt:
    """Hide ``needle`` at ``depth_ratio`` of the filler, ask ``question``, open the answer.

    The prompt is context + question (as the user turn when there is a chat template),
    then the assistant header and ``answer_prefix``. ``answer`` defaults to the rest of
    the needle after ``answer_prefix`` (the classic setup, where the needle *is* the
    answer sentence).
    """
    if not 0.0 <= depth_ratio <= 1.0:
        raise ValueError(f"depth_ratio must be in [0, 1], got {depth_ratio}")
    if answer is None:
        if not answer_prefix or not needle.startswith(answer_prefix):
            raise ValueError("pass answer= unless the needle starts with a non-empty answer_prefix")
        answer = needle[len(answer_prefix) :]
    # The answer continues the prefix on its line, or opens the assistant turn.
    answer = (" " if answer_prefix else "") + answer.strip()
    frame = _frame(tokenizer, generation=True)
    needle_ids = _encode(tokenizer, f"\n{needle.strip()}\n")
    tail = (
        _encode(tokenizer, f"\n\n{question.strip()}")
        + frame.user_to_assistant
        + (_encode(tokenizer, answer_prefix) if answer_prefix else [])
    )
    fixed = len(frame.before_user) + len(needle_ids) + len(tail)
    budget = context_length - fixed
    if budget < 0:
        raise ValueError(
            f"context_length {context_length} is too short: needle, question and template take {fixed} tokens"
        )
    filler = _filler(haystack_ids, 0, budget)
    cut = round(depth_ratio * budget)
    head = frame.before_user + filler[:cut]
    ids = head + needle_ids + filler[cut:] + tail
    return NeedlePrompt(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(_encode(tokenizer, answer), dtype=torch.long),
        (len(head), len(head) + len(needle_ids)),
    )
