"""What every evaluation shares: prompts, caches, pre-fill, the one greedy decoding, the answer score, the attention
methods compared, and the grid that scores every prompt under every method.

Why two scores per prompt: greedy exact match is what a user sees, but a small model's greedy answers get flaky at
long contexts even with full attention. Teacher-forced answer-token accuracy (the argmax at every answer position,
given the correct prefix) isolates whether the needle can still be *read* through the KV cache, which is exactly
what turning heads into streaming heads can break.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..compat import cache_kwargs
from ..kv_cache import DuoCache
from ..learn.data import NeedlePrompt
from ..patch import disable_duo_attention, enable_duo_attention_eval
from ..patterns import PatternError, load_attn_pattern, sparsify_attention_heads

DEFAULT_SINK_SIZE, DEFAULT_RECENT_SIZE = 64, 256  # streaming window when neither flags nor a pattern say otherwise
METHOD_KINDS: tuple[str, ...] = ("full", "duo", "baseline", "random", "streaming")
HAYSTACK_CHARS_PER_TOKEN = 16  # read this many haystack characters per context token: plenty, never the whole corpus


# ------------------------------------------------------------------------------------------------------ prompts


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts should be wrapped as a user turn (instruction-tuned tokenizers carry a template)."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, text: str, *, chat: bool, assistant_prefix: str = "") -> list[int]:
    """Token ids for ``text``, as a single user turn when ``chat`` (the template then supplies BOS and the like).

    ``assistant_prefix`` is appended after the generation prompt, i.e. it starts the model's answer.
    """
    if chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered + assistant_prefix, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text + assistant_prefix)["input_ids"])


# ------------------------------------------------------------------------------------------ caches and decoding


def new_cache(model: PreTrainedModel) -> Cache:
    """The cache the model would make itself: a `DuoCache` when it is duo-patched, else a `DynamicCache`."""
    if getattr(model, "duo_attention", None) is not None:
        return DuoCache.for_model(model)
    return DynamicCache(config=model.config)


def kv_bytes(cache: Cache) -> int:
    """Bytes of keys and values a cache holds (a DuoCache counts its streaming windows at their fixed size)."""
    if isinstance(cache, DuoCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def prefill(model: PreTrainedModel, prompt_ids: torch.Tensor, cache: Cache, chunk_size: int = 1024) -> torch.Tensor:
    """Feed the prompt ``chunk_size`` tokens at a time into ``cache``; returns the last token's logits ``[vocab]``.

    Chunking bounds the attention-score memory of long prompts, and exercises the duo cache as serving would.
    """
    ids = prompt_ids.reshape(1, -1).to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        logits = model(chunk, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
    return logits[0, -1]


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-sequence ids greedy decoding stops at: the model's generation config's, then the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def greedy_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    cache: Cache | None = None,
    stop_ids: Sequence[int] = (),
    min_new_tokens: int | None = None,
    chunk_size: int | None = None,
) -> list[int]:
    """The greedy decoding of every evaluation: transformers' ``generate`` (no sampling, one beam) after one prompt,
    stopping at `eos_ids` and ``stop_ids``; returns the new ids, the stopping one included.

    ``cache`` continues a pre-filled cache, which then holds every token of ``input_ids`` but the last.
    ``min_new_tokens`` forbids stopping earlier. ``chunk_size`` (without ``cache``) first pre-fills every token but
    the last, eagerly, in chunks of that many tokens (`prefill`) into the model's own dynamic cache (`new_cache`),
    and ``generate`` continues it. Not ``generate``'s ``prefill_chunk_size``: on a GPU that compiles the pre-fill,
    which traces again for every new prompt length (its last chunk's), so a suite of prompts of many lengths spent
    most of its time compiling. The rest of the model's generation config applies, as in LongBench's ``pred.py``.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if chunk_size is not None and cache is None and ids.shape[1] > 1:
        cache = new_cache(model)
        prefill(model, ids[:, :-1], cache, chunk_size)
    stop = list(dict.fromkeys([*eos_ids(model, tokenizer), *stop_ids]))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if min_new_tokens is not None:
        kwargs["min_new_tokens"] = min_new_tokens
    if stop:
        kwargs["eos_token_id"] = stop
    if getattr(model.generation_config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0]
    if cache is not None:
        kwargs.update(cache_kwargs(model, cache))
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return output[0, ids.shape[1] :].tolist()


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    stop_at_newline: bool = False,
    chunk_size: int | None = None,
) -> str:
    """Greedy continuation of one prompt (`greedy_ids`), decoded without special tokens.

    ``stop_at_newline`` adds the newline token to the stop ids and forces at least one new token (LongBench's samsum
    setting, which keeps models from rambling on with invented dialogues). ``chunk_size`` prefills the prompt in
    chunks of that many tokens to bound activation memory on long inputs.
    """
    newline = [tokenizer.encode("\n", add_special_tokens=False)[-1]] if stop_at_newline else []
    new = greedy_ids(
        model, tokenizer, input_ids, max_new_tokens, stop_ids=newline, min_new_tokens=1 if newline else None,
        chunk_size=chunk_size,
    )  # fmt: skip
    return tokenizer.decode(new, skip_special_tokens=True)


def _greedy_after_prefill(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    cache: Cache,
    last_logits: torch.Tensor,
    max_new_tokens: int,
) -> list[int]:
    """`greedy_ids` after a prompt already pre-filled into ``cache``: the first token is the argmax of the prompt's
    ``last_logits``, the rest continue the cache."""
    first = last_logits.argmax().view(1)
    if int(first) in eos_ids(model, tokenizer) or max_new_tokens == 1:
        return first.tolist()
    ids = torch.cat([prompt_ids.reshape(-1).to(first.device), first])
    return [int(first), *greedy_ids(model, tokenizer, ids, max_new_tokens - 1, cache=cache)]


# ------------------------------------------------------------------------------------------------ answer score


@dataclasses.dataclass(frozen=True)
class AnswerScore:
    """How one prompt fared under the model's current attention; ``seconds`` is pre-fill plus greedy decoding."""

    generated: str
    greedy_match: bool
    teacher_forced_accuracy: float
    kv_bytes: int
    prefill_seconds: float
    seconds: float


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs, so line breaks or double spaces in a generation do not hide a correct answer."""
    return " ".join(text.split())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _teacher_forced_accuracy(
    model: PreTrainedModel, cache: Cache, last_logits: torch.Tensor, answer_ids: torch.Tensor
) -> float:
    predictions = [last_logits.argmax().view(1)]
    if answer_ids.numel() > 1:
        logits = model(answer_ids[None, :-1], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=0).logits
        predictions.append(logits[0].argmax(-1))
    return (torch.cat(predictions) == answer_ids).float().mean().item()


def score_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    *,
    answer: str | None = None,
    chunk_size: int = 1024,
    extra_new_tokens: int = 8,
) -> AnswerScore:
    """Score one prompt under the model's current attention (full, or duo when patched).

    (1) Pre-fills the prompt in chunks and decodes greedily up to ``len(answer_ids) + extra_new_tokens`` tokens
    (stopping at EOS); a match is ``answer`` (default: the decoded answer ids) occurring in the text, whitespace
    normalised. ``kv_bytes`` is what the cache holds after pre-fill; ``seconds`` is pre-fill plus decoding.
    (2) On a copy of the pre-filled cache, feeds the answer tokens as one chunk and counts the argmax predictions
    equal to the next answer token; the first answer token is predicted from the prompt's last logits.
    """
    device = model.device
    answer_ids = answer_ids.reshape(-1).to(device)
    if answer_ids.numel() == 0:
        raise ValueError("the answer is empty")
    expected = normalize_whitespace(
        tokenizer.decode(answer_ids.tolist(), skip_special_tokens=True) if answer is None else answer
    )
    if not expected:
        raise ValueError("the answer is only whitespace; greedy matching would be meaningless")
    _synchronize(device)
    start = time.perf_counter()
    cache = new_cache(model)
    last_logits = prefill(model, prompt_ids, cache, chunk_size)
    _synchronize(device)
    prefill_seconds = time.perf_counter() - start
    held = kv_bytes(cache)
    forced_cache = copy.deepcopy(cache)  # not timed
    start = time.perf_counter()
    budget = answer_ids.numel() + extra_new_tokens
    tokens = _greedy_after_prefill(model, tokenizer, prompt_ids, cache, last_logits, budget)
    _synchronize(device)
    seconds = prefill_seconds + time.perf_counter() - start
    del cache
    accuracy = _teacher_forced_accuracy(model, forced_cache, last_logits, answer_ids)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return AnswerScore(text, expected in normalize_whitespace(text), accuracy, held, prefill_seconds, seconds)


def key_only(tokenizer: PreTrainedTokenizerBase, prompt: NeedlePrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Move leading whitespace-only answer tokens into the prompt: ``(prompt_ids, answer_ids)``.

    SmolLM2 encodes " 7491" as " ", "7", "4", "9", "1"; the lone space is trivially predictable, so leaving it in
    would inflate teacher-forced accuracy. Afterwards the accuracy counts only the key's own tokens.
    """
    answer = prompt.answer_ids
    moved = 0
    while moved < answer.numel() - 1 and not tokenizer.decode(answer[moved : moved + 1].tolist()).strip():
        moved += 1
    return torch.cat([prompt.prompt_ids, answer[:moved]]), answer[moved:]


# ------------------------------------------------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One attention setting to evaluate: full attention (``retrieval_mask`` None, model unpatched) or a duo mask,
    its retrieval heads' cache stored as ``kv_quant`` (None: the model dtype)."""

    name: str
    kind: str
    retrieval_mask: np.ndarray | None  # [layers, kv_heads] bool, True = retrieval head
    sink_size: int
    recent_size: int
    source: str | None = None  # the pattern directory, or the random seed, the mask came from
    kv_quant: str | None = None  # e.g. "int4" (enable_duo_attention_eval's kv_quant)
    min_retrieval_per_layer: int = 0  # the floor the mask was sparsified with (sparsify_attention_heads)

    @property
    def retrieval_fraction(self) -> float:
        return 1.0 if self.retrieval_mask is None else float(self.retrieval_mask.mean())

    @property
    def retrieval_heads(self) -> str:
        """E.g. ``"22/90 (24%)"``: the exact count, since a sparsity rarely divides the head count evenly."""
        if self.retrieval_mask is None:
            return "all"
        return f"{int(self.retrieval_mask.sum())}/{self.retrieval_mask.size} ({self.retrieval_fraction:.0%})"

    def apply(self, model: PreTrainedModel) -> None:
        """Put ``model`` into this setting (patching, re-patching or unpatching it)."""
        if self.retrieval_mask is None:
            if getattr(model, "duo_attention", None) is not None:
                disable_duo_attention(model)
            return
        enable_duo_attention_eval(
            model, self.retrieval_mask.astype(np.float64), sink_size=self.sink_size, recent_size=self.recent_size,
            kv_quant=self.kv_quant,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, mask included, so a result file says exactly which heads were streaming."""
        mask = self.retrieval_mask
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "retrieval_fraction": self.retrieval_fraction,
            "sparsity": 1.0 - self.retrieval_fraction,
            "sink_size": None if mask is None else self.sink_size,
            "recent_size": None if mask is None else self.recent_size,
            "retrieval_mask": None if mask is None else mask.astype(int).tolist(),
            "kv_quant": self.kv_quant,
            "min_retrieval_per_layer": self.min_retrieval_per_layer,
        }


def window_sizes(pattern: str | Path | None, sink_size: int | None, recent_size: int | None) -> tuple[int, int]:
    """Streaming window for every duo method: explicit values, else the pattern's ``config.json``, else 64/256.

    One window for all methods, so they are compared at the same KV budget.
    """
    file_sink, file_recent = (DEFAULT_SINK_SIZE, DEFAULT_RECENT_SIZE)
    if pattern is not None:
        _, file_sink, file_recent = load_attn_pattern(pattern)
    return (file_sink if sink_size is None else sink_size), (file_recent if recent_size is None else recent_size)


def build_methods(
    config: PreTrainedConfig,
    kinds: Sequence[str],
    *,
    sparsities: Sequence[float] = (),
    sink_size: int = DEFAULT_SINK_SIZE,
    recent_size: int = DEFAULT_RECENT_SIZE,
    pattern: str | Path | None = None,
    baseline_pattern: str | Path | None = None,
    random_seeds: Sequence[int] = (0,),
    kv_quants: Sequence[str | None] = (None,),
    min_retrieval_per_layer: int = 0,
) -> list[Method]:
    """Methods in the order of ``kinds``: ``full``; ``streaming`` (every head streaming); and, at each sparsity and
    each of ``kv_quants``, ``duo`` (``pattern``'s gates), ``baseline`` (``baseline_pattern``'s gates) and ``random``
    (seeded random gates, so masks at different sparsities are nested; one set per seed of ``random_seeds``, named
    ``random@0.50-seed3`` when there are several, since one draw can be lucky). Full and streaming-only have no
    retrieval cache to quantize, so they come once.

    ``min_retrieval_per_layer``: the gate methods keep at least that many retrieval heads in every layer
    (`sparsify_attention_heads`); a nonzero floor is named in the method, ``duo@0.50-floor1`` (a suffix that
    stays as it is in the heatmaps' file names), before any ``+int4``."""
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    if not random_seeds or len(set(random_seeds)) != len(random_seeds):
        raise ValueError(f"random_seeds must be distinct and at least one, got {list(random_seeds)}")
    gate_sources: dict[str, list[tuple[np.ndarray, str, str]]] = {}  # kind: [(gates, source, name suffix)]
    for kind, path in (("duo", pattern), ("baseline", baseline_pattern)):
        if kind in kinds:
            if path is None:
                raise PatternError(f"method {kind!r} needs a pattern directory")
            gate_sources[kind] = [(load_attn_pattern(path)[0], str(path), "")]
    several = len(random_seeds) > 1
    gate_sources["random"] = [
        (np.random.default_rng(seed).random(shape), f"seed {seed}", f"-seed{seed}" if several else "")
        for seed in random_seeds
    ]
    floor = min_retrieval_per_layer
    suffix = f"-floor{floor}" if floor else ""
    methods: list[Method] = []
    for kind in kinds:
        if kind == "full":
            methods.append(Method("full", kind, None, sink_size, recent_size))
        elif kind == "streaming":
            methods.append(Method("streaming", kind, np.zeros(shape, dtype=bool), sink_size, recent_size))
        elif kind in gate_sources:
            if not sparsities:
                raise ValueError(f"method {kind!r} needs at least one sparsity")
            for gates, source, draw in gate_sources[kind]:
                if gates.shape != shape:
                    raise PatternError(f"{source}: pattern has shape {gates.shape}, the model needs {shape}")
                for sparsity in sparsities:
                    mask, _ = sparsify_attention_heads(gates, sparsity=sparsity, min_retrieval_per_layer=floor)
                    for kv in kv_quants:  # named by the sparsity asked for
                        name = f"{kind}@{sparsity:.2f}" + suffix + draw + (f"+{kv}" if kv else "")
                        methods.append(Method(name, kind, mask, sink_size, recent_size, source, kv, floor))
        else:
            raise ValueError(f"unknown method {kind!r}; expected one of {METHOD_KINDS}")
    return methods


# --------------------------------------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class GridCell:
    """One prompt of a grid: where its needle is, and the answer it should produce."""

    context_length: int
    depth: float
    sample: int
    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    answer: str


def run_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    cells: Sequence[GridCell],
    *,
    chunk_size: int = 1024,
    extra_new_tokens: int = 8,
    desc: str = "grid",
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Score every cell under every method; one JSON-ready record per (method, cell). The model ends unpatched.

    Runs context length by context length (in the order the cells first name them), every method at one length
    before the next, so a run cut short compares all methods on the same cells. ``deadline`` (a
    `time.perf_counter` value) stops it before the first cell that would start later; the records scored so far are
    returned.
    """
    records = []
    contexts = list(dict.fromkeys(cell.context_length for cell in cells))
    try:
        with tqdm(total=len(methods) * len(cells), desc=desc, unit="cell") as bar:
            for context in contexts:
                for method in methods:
                    method.apply(model)
                    for cell in (c for c in cells if c.context_length == context):
                        if deadline is not None and time.perf_counter() >= deadline:
                            bar.write(f"{desc}: time limit reached after {len(records)} of "
                                      f"{len(methods) * len(cells)} cells")  # fmt: skip
                            return records
                        bar.set_postfix_str(f"{method.name} {cell.context_length} tok depth {cell.depth:g}")
                        score = score_answer(
                            model, tokenizer, cell.prompt_ids, cell.answer_ids, answer=cell.answer,
                            chunk_size=chunk_size, extra_new_tokens=extra_new_tokens,
                        )  # fmt: skip
                        records.append({
                            "method": method.name, "context_length": cell.context_length, "depth": cell.depth,
                            "sample": cell.sample, "prompt_tokens": int(cell.prompt_ids.numel()),
                            "answer": cell.answer, **dataclasses.asdict(score),  # generated, greedy_match, ...
                        })  # fmt: skip
                        bar.update()
    finally:
        if getattr(model, "duo_attention", None) is not None:
            disable_duo_attention(model)
    return records
