"""The block-sparse streaming pre-fill: its block lists cover the rule, and the model output stays exact."""

import numpy as np
import pytest
import torch
from duo_reference import DEVICE, chunked_logits, device_model, oracle_logits, oracle_model
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_attn import enable_duo_attention_eval
from duo_attn.kernels.flex import BLOCK, flex_attention, streaming_block_mask
from duo_attn.masks import allowed_keys




needs_flex = pytest.mark.skipif(flex_attention is None, reason="this torch has no FlexAttention")


@needs_flex
@settings(max_examples=60, deadline=None)
@given(
    sink=st.integers(0, 200),
    recent=st.integers(1, 300),
    cached=st.integers(0, 900),
    num_queries=st.integers(1, 700),
)
def test_block_lists_cover_every_visible_key(sink, recent, cached, num_queries):
    num_slots = sink + recent
    # slot positions as the cache holds them after `cached` tokens: sinks, then a ring of the last `recent`
    slot_pos = torch.full((num_slots,), -1)
    slot_pos[: min(sink, cached)] = torch.arange(min(sink, cached))
    for t in range(max(0, cached - recent), cached):
        slot_pos[sink + t % recent] = t if t >= sink else -1
    query_pos = torch.arange(cached, cached + num_queries)[None]
    key_pos = torch.cat([slot_pos, query_pos[0]])[None]
    dense = allowed_keys(query_pos, key_pos, sink_size=sink, recent_size=recent)[0, 0]
    mask = streaming_block_mask(slot_pos, cached, num_queries, sink, recent)
    listed = torch.zeros(-(-num_queries // BLOCK), -(-key_pos.shape[1] // BLOCK), dtype=torch.bool)
    counts, indices = mask.kv_num_blocks[0, 0], mask.kv_indices[0, 0]
    for q in range(listed.shape[0]):
        listed[q, indices[q, : counts[q]].long()] = True
    needed = listed.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: dense.shape[0], : dense.shape[1]]
    assert not (dense & ~needed).any(), "a visible key lies in a block the mask skips"
    # the mask function applied inside the blocks is the rule itself
    q_idx, kv_idx = torch.meshgrid(torch.arange(dense.shape[0]), torch.arange(dense.shape[1]), indexing="ij")
    assert torch.equal(mask.mask_mod(0, 0, q_idx, kv_idx), dense)
    # and the mask is sparse: far fewer blocks than the dense lower triangle once the chunk is long
    if num_queries >= 4 * (num_slots + BLOCK):
        assert counts.max() <= (num_slots + recent) // BLOCK + 4


def _assert_matches_oracle(arch, mask, sink, recent, length, chunks, seed):
    model = device_model(arch)
    oracle = oracle_model(model, mask, sink, recent)
    ids = torch.randint(1, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    padding = torch.ones_like(ids)
    enable_duo_attention_eval(model, mask, sink_size=sink, recent_size=recent)
    ours, _ = chunked_logits(model, ids.to(DEVICE), padding.to(DEVICE), chunks)
    torch.testing.assert_close(ours.double(), oracle_logits(oracle, ids, padding), atol=2e-4, rtol=1e-4)


@needs_flex
def test_flex_prefill_matches_the_oracle(monkeypatch):
    monkeypatch.setenv("DUO_ATTN_FLEX", "always")
    _assert_matches_oracle("llama", np.array([[True, False], [False, False]]), 5, 37, 700, [300, 390, 1, 1, 8], 4)


def _flash_attn_as_documented(q, k, v, softmax_scale=None, causal=False):
    """flash-attn's contract: [B, S, H, D] tensors, K/V heads shared by groups of query heads, causal masks aligned
    bottom-right (query i may read key j <= i + Sk - Sq)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = None
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        rows, cols = torch.arange(sq, device=q.device), torch.arange(sk, device=q.device)
        mask = cols[None, :] <= rows[:, None] + (sk - sq)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    _flash_attn_as_documented.calls += 1
    return out.transpose(1, 2)


def test_flash_attn_backend_is_used_and_exact(monkeypatch):
    from duo_attn.kernels import dense as kernels

    _flash_attn_as_documented.calls = 0
    monkeypatch.setattr(kernels, "flash_attn_func", _flash_attn_as_documented)
    monkeypatch.setattr(kernels, "FLASH_DEVICES", (DEVICE.type,))
    monkeypatch.setattr(kernels, "FLASH_DTYPES", (torch.float32,))
    _assert_matches_oracle("qwen2", np.array([[True, False], [False, True]]), 2, 5, 40, [16, 9, 1, 1, 1, 12], 5)
    assert _flash_attn_as_documented.calls > 0
