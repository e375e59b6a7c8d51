"""An independent, deliberately naive statement of DuoAttention's rule, used as the oracle of the core tests.

The whole sequence is run at once in float64, without any cache, and every head gets an explicit dense mask built
from per-sequence positions counted in Python: retrieval heads see keys j <= i, streaming heads see keys j <= i with
j < sink or i - j < recent.

For a quantized cache, `oracle_logits` takes what the cache stored (``stored``): the retrieval heads' keys and values
as the cache dequantizes them, and which (query, key) pairs see the key as computed instead (``fresh``: a chunk
attends to itself in full precision). The oracle then records its own keys and values (``oracle_kv``), so a test can
check that what was stored is the quantization of the right tokens.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duo_attn.compat import cache_kwargs, output_cache
from duo_attn.models import tiny_model

NAME = "duo_reference_oracle"
# Model-level tests run on a GPU with DUO_ATTN_TEST_DEVICE=cuda; the oracle always runs on the CPU in float64.
DEVICE = torch.device(os.environ.get("DUO_ATTN_TEST_DEVICE", "cpu"))


def device_model(arch: str, **overrides) -> torch.nn.Module:
    return tiny_model(arch, **overrides).to(DEVICE)


def _positions(padding_mask: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in padding_mask.tolist():
        count, positions = 0, []
        for real in row:
            positions.append(count if real else -1)
            count += int(real)
        rows.append(positions)
    return rows


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    retrieval_row, sink, recent = module.oracle_spec
    batch, n_q, length, _ = query.shape
    groups = n_q // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    padding = attention_mask if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    allowed = torch.zeros(batch, n_q, length, length, dtype=torch.bool)
    for b, pos in enumerate(_positions(padding)):
        p = torch.tensor(pos)
        qi, kj = p[:, None], p[None, :]
        causal = (kj >= 0) & (kj <= qi)
        window = causal & ((kj < sink) | (qi - kj < recent))
        for h in range(n_q):
            allowed[b, h] = (causal if retrieval_row[h // groups] else window) | (qi < 0)
    stored = getattr(module, "oracle_stored", None)
    if stored is None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).contiguous(), None
    module.oracle_kv = key[:, ::groups], value[:, ::groups]
    stored_keys, stored_values, fresh = stored
    stored_keys, stored_values = (t.repeat_interleave(groups, dim=1) for t in (stored_keys, stored_values))
    is_retrieval = torch.tensor([bool(retrieval_row[h // groups]) for h in range(n_q)])[:, None, None]
    from_store = is_retrieval & ~fresh  # [heads, queries, keys]: this query reads this key as the cache stored it
    scores = torch.where(from_store, (query @ stored_keys.transpose(-1, -2)) * scaling, scores)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = weights.masked_fill(from_store, 0) @ value + weights.masked_fill(~from_store, 0) @ stored_values
    return out.transpose(1, 2).contiguous(), None


def _oracle_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    return attention_mask


AttentionInterface.register(NAME, _oracle_attention)
AttentionMaskInterface.register(NAME, _oracle_mask)


def oracle_model(model: torch.nn.Module, retrieval_mask: np.ndarray, sink: int, recent: int) -> torch.nn.Module:
    """A float64 copy of an unpatched ``model`` that applies the rule by dense masking."""
    oracle = copy.deepcopy(model).to("cpu", torch.float64)
    for layer, row in zip(oracle.model.layers, np.asarray(retrieval_mask, dtype=bool)):
        layer.self_attn.oracle_spec = (row, sink, recent)
    oracle.set_attn_implementation(NAME)
    return oracle


def position_ids_for(padding_mask: torch.Tensor) -> torch.Tensor:
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def oracle_logits(
    oracle: torch.nn.Module,
    input_ids: torch.Tensor,
    padding_mask: torch.Tensor,
    stored: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    fresh: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle's logits. ``stored``: per layer, the retrieval heads' keys and values ``[B, H_kv, T, D]`` as a
    quantized cache holds them (rows of streaming heads unused), read wherever ``fresh [T, T]`` (query, key) is
    False; afterwards each attention module's ``oracle_kv`` holds the keys and values it computed."""
    input_ids, padding_mask = input_ids.cpu(), padding_mask.cpu()
    layers = oracle.model.layers
    for layer, kv in zip(layers, stored or []):
        layer.self_attn.oracle_stored = (*(t.cpu().double() for t in kv), fresh)
    try:
        return oracle(
            input_ids=input_ids,
            attention_mask=padding_mask,
            position_ids=position_ids_for(padding_mask),
            use_cache=False,
        ).logits
    finally:
        for layer in layers:
            layer.self_attn.__dict__.pop("oracle_stored", None)


@torch.no_grad()
def chunked_logits(model, input_ids, padding_mask, chunk_sizes, cache=None) -> tuple[torch.Tensor, object]:
    """Feed the sequence chunk by chunk through ``model`` with a cache; return all logits (on the CPU) and the cache."""
    input_ids, padding_mask = input_ids.to(model.device), padding_mask.to(model.device)
    position_ids = position_ids_for(padding_mask)
    logits, start = [], 0
    for size in chunk_sizes:
        end = start + size
        out = model(
            input_ids=input_ids[:, start:end],
            attention_mask=padding_mask[:, :end],
            position_ids=position_ids[:, start:end],
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        cache = output_cache(out)
        logits.append(out.logits)
        start = end
    assert start == input_ids.shape[1]
    return torch.cat(logits, dim=1).cpu(), cache
