"""Synthetic long-context samples: multi-passkey training samples and needle-in-a-haystack prompts.

DuoAttention learns which heads must see the whole context by asking the model to recall
passkeys hidden at random depths of a long filler text (the "haystack", `duo_attn.learn.haystack`).
Every sample is assembled from separately tokenized pieces, so the token span of every passkey and
answer is known exactly rather than recovered by searching decoded text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .haystack import ChatFrame, chat_frame, encode_piece, take_filler

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
    frame = chat_frame(tokenizer, generation=False)
    needles, questions, answers = _passkey_pieces(tokenizer, passkeys)
    pieces = [frame.before_user, frame.user_to_assistant, frame.after_assistant, questions]
    fixed = sum(map(len, pieces)) + sum(len(piece) for parts in needles + answers for piece in parts)
    budget = context_length - fixed
    if budget < 0:
        raise ValueError(
            f"context_length {context_length} is too short for {num_passkeys} passkeys: "
            f"the needles, questions and answers alone take {fixed} tokens"
        )
    context = take_filler(haystack_ids, rng.getrandbits(32), budget)
    ids, passkey_spans, answer_spans, answer_passkey_spans = _assemble(
        frame, context, depths, needles, questions, answers
    )
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in answer_spans:
        labels[start:end] = input_ids[start:end]
    return PasskeySample(input_ids, labels, passkeys, passkey_spans, depths, answer_spans, answer_passkey_spans)


_Pieces = tuple[list[int], list[int], list[int]]  # before the key, the key, after the key
_Spans = list[tuple[int, int]]


def _passkey_pieces(
    tokenizer: PreTrainedTokenizerBase, passkeys: Sequence[str]
) -> tuple[list[_Pieces], list[int], list[_Pieces]]:
    """The needle sentences, the questions and the answer sentences of a sample, each key tokenized once."""
    numbers = range(1, len(passkeys) + 1)
    key_pieces = [encode_piece(tokenizer, f" {key}") for key in passkeys]
    needle_tail = encode_piece(tokenizer, ". Remember it.\n")
    needles = [
        (encode_piece(tokenizer, f"\nThe pass key number {n} is"), key_ids, needle_tail)
        for n, key_ids in zip(numbers, key_pieces)
    ]
    questions = encode_piece(tokenizer, "\n\n" + " ".join(f"What is the pass key number {n}?" for n in numbers))
    full_stop = encode_piece(tokenizer, ".")
    answers = [
        (encode_piece(tokenizer, f"{'' if n == 1 else ' '}The pass key number {n} is"), key_ids, full_stop)
        for n, key_ids in zip(numbers, key_pieces)
    ]
    return needles, questions, answers


def _assemble(
    frame: ChatFrame,
    context: list[int],
    depths: Sequence[float],
    needles: Sequence[_Pieces],
    questions: list[int],
    answers: Sequence[_Pieces],
) -> tuple[list[int], _Spans, _Spans, _Spans]:
    """``(ids, passkey spans, answer spans, answer passkey spans)``: the needles cut into the ``context`` filler at
    their depths, then the questions and, in the assistant turn, the answers."""
    budget = len(context)
    ids = list(frame.before_user)
    passkey_spans: _Spans = []
    cursor = 0
    for depth, (head, key, tail) in zip(depths, needles):
        cut = round(depth * budget)
        ids += context[cursor:cut] + head
        passkey_spans.append((len(ids), len(ids) + len(key)))
        ids += key + tail
        cursor = cut
    ids += context[cursor:] + questions + frame.user_to_assistant
    answer_spans: _Spans = []
    answer_passkey_spans: _Spans = []
    for head, key, tail in answers:
        start = len(ids)
        ids += head
        answer_passkey_spans.append((len(ids), len(ids) + len(key)))
        ids += key + tail
        answer_spans.append((start, len(ids)))
    ids += frame.after_assistant
    return ids, passkey_spans, answer_spans, answer_passkey_spans


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
    frame = chat_frame(tokenizer, generation=True)
    needle_ids = encode_piece(tokenizer, f"\n{needle.strip()}\n")
    tail = (
        encode_piece(tokenizer, f"\n\n{question.strip()}")
        + frame.user_to_assistant
        + (encode_piece(tokenizer, answer_prefix) if answer_prefix else [])
    )
    fixed = len(frame.before_user) + len(needle_ids) + len(tail)
    budget = context_length - fixed
    if budget < 0:
        raise ValueError(
            f"context_length {context_length} is too short: needle, question and template take {fixed} tokens"
        )
    context = take_filler(haystack_ids, 0, budget)
    cut = round(depth_ratio * budget)
    head = frame.before_user + context[:cut]
    ids = head + needle_ids + context[cut:] + tail
    return NeedlePrompt(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(encode_piece(tokenizer, answer), dtype=torch.long),
        (len(head), len(head) + len(needle_ids)),
    )
