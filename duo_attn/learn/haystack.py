"""Filler text for long contexts (the "haystack") and the token pieces synthetic prompts are assembled from.

Every prompt is built from separately tokenized pieces (`encode_piece`), placed inside the tokenizer's own chat
template (`chat_frame`) around haystack filler (`take_filler`), so the token span of every inserted sentence is known
exactly rather than recovered by searching decoded text.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase


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


def encode_piece(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
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
class ChatFrame:
    """Token ids around the user text and the assistant text of one exchange."""

    before_user: list[int]
    user_to_assistant: list[int]
    after_assistant: list[int]


def chat_frame(tokenizer: PreTrainedTokenizerBase, *, generation: bool) -> ChatFrame:
    """Split the chat template around sentinel messages; plain text when there is none.

    ``generation`` renders the prompt as the model sees it before answering (generation
    prompt, no closing turn); otherwise the full exchange, as for training.
    """
    if not tokenizer.chat_template:
        return ChatFrame(_special_prefix(tokenizer), encode_piece(tokenizer, "\n"), [])
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

    return ChatFrame(ids(before), ids(middle), ids(after))


def take_filler(haystack_ids: Sequence[int], start: int, count: int) -> list[int]:
    """``count`` haystack tokens from ``start`` (modulo its length), wrapping around."""
    if not haystack_ids:
        raise ValueError("the haystack is empty")
    out: list[int] = []
    position = start % len(haystack_ids)
    while len(out) < count:
        out.extend(haystack_ids[position : position + count - len(out)])
        position = 0
    return out
