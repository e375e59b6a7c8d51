"""Split-KV decode attention in Triton ("flash decoding"), for one query token per sequence.

Why a kernel of our own: a decode step captured in a CUDA graph must have static shapes, so the retrieval cache is a
reserved buffer and the number of valid keys lives in a device tensor. SDPA's flash kernel cannot read a length from
device memory (it would need a slice, a new shape each step), and its masked kernels do not split the keys, so a few
heads of one query each leave most of the GPU idle. Here each (sequence, KV head) is split into ``num_splits`` key
ranges sized from the current length, so only valid keys are read and every SM has work; the query heads of a GQA
group share each key load. A second kernel merges the splits by their log-sum-exp.

Keys are valid when their index is below ``length`` and, if ``key_pos`` is given, their position is ``>= 0`` (padding
and empty streaming slots are ``-1``). At least one key per sequence must be valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner step
SPLITS_PER_SM = 4  # CTAs in flight per SM the split count aims for
MAX_SPLITS = 128
LOG2E = 1.4426950408889634


@triton.jit
def _split_range(LENGTH, num_kv_heads, num_splits, BLOCK_N: tl.constexpr):
    """This program's split, (sequence, KV head) index, sequence, KV head, and its key range ``[start, end)``: the
    valid length cut into ``num_splits`` ranges of whole ``BLOCK_N`` blocks. Shared by every split kernel."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_kv_heads).to(tl.int64)  # 64-bit offsets: a long cache's head stride times heads exceeds 2**31
    h = (bh % num_kv_heads).to(tl.int64)
    length = tl.load(LENGTH)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    return split, bh, b, h, start, tl.minimum(start + per_split, length)


@triton.jit
def _online_softmax(s, m, denom):
    """One block of base-2 scores ``s [rows, keys]`` into the running max ``m`` and ``denom``: the block's weights
    ``p``, the factor ``alpha`` that rescales what was accumulated before, and the new ``m`` and ``denom``."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing valid yet: avoid -inf - -inf
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, denom * alpha + tl.sum(p, 1)


@triton.jit
def _split_kernel(
    Q, K, V, LENGTH, POS, O_PART, LSE_PART,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sp_b,
    num_kv_heads, groups, num_splits, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_POS: tl.constexpr, IEEE: tl.constexpr,
):
    split, bh, b, h, start, end = _split_range(LENGTH, num_kv_heads, num_splits, BLOCK_N)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * sq_b + (h * groups + g)[:, None] * sq_h + d[None, :],
                mask=(g < groups)[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D_PAD], tl.float32)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_POS:
            valid = valid & (tl.load(POS + b * sp_b + n, mask=valid, other=-1) >= 0)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        p, alpha, m_new, denom = _online_softmax(s, m, denom)
        v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    row = (bh * num_splits + split) * BLOCK_G + g
    denom_safe = tl.where(denom > 0, denom, 1.0)  # a split with no valid key: weight 0 in the merge
    tl.store(LSE_PART + row, tl.where(denom > 0, m + tl.log2(denom_safe), float("-inf")))
    tl.store(O_PART + row[:, None] * D_PAD + d[None, :], acc / denom_safe[:, None])


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, OUT, so_b, so_h, num_q_heads, groups, num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_q_heads
    hq = pid % num_q_heads
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D_PAD)
    row = ((b * (num_q_heads // groups) + hq // groups) * num_splits + s) * BLOCK_G + hq % groups
    lse = tl.load(LSE_PART + row, mask=s < num_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(O_PART + row[:, None] * D_PAD + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(OUT + b * so_b + hq * so_h + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


_SM_COUNT: dict[int, int] = {}


def _num_splits(device: torch.device, parallel: int, capacity: int) -> int:
    """Enough key ranges for ``SPLITS_PER_SM`` CTAs per SM, no more than there are key blocks."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]
    else:
        sms = 4  # the Triton interpreter (tests): a few splits exercise the merge
    want = -(-SPLITS_PER_SM * sms // parallel)
    return max(1, min(want, -(-capacity // BLOCK_N), MAX_SPLITS))


def triton_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``query [B, H_kv * G, 1, D]`` over ``key/value [B, H_kv, capacity, D]`` (any strides, last dim contiguous);
    ``length`` is a 1-element int tensor on the device; ``key_pos [B, capacity]`` marks invalid keys with ``-1``.
    ``out``: where to write the ``[B, H_kv * G, 1, D]`` result (any strides, e.g. a slice of a larger output)."""
    batch, num_q_heads, _, head_dim = query.shape
    num_kv_heads, capacity = key.shape[1], key.shape[2]
    groups = num_q_heads // num_kv_heads
    block_g = max(16, triton.next_power_of_2(groups))  # tl.dot needs 16 rows
    d_pad = max(16, triton.next_power_of_2(head_dim))
    splits = _num_splits(query.device, batch * num_kv_heads, capacity)
    o_part = torch.empty(batch * num_kv_heads * splits * block_g, d_pad, dtype=torch.float32, device=query.device)
    lse_part = torch.empty(batch * num_kv_heads * splits * block_g, dtype=torch.float32, device=query.device)
    out = torch.empty_like(query) if out is None else out
    pos = key_pos if key_pos is not None else length  # any pointer: not read without HAS_POS
    _split_kernel[(splits, batch * num_kv_heads)](
        query, key, value, length, pos, o_part, lse_part,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), pos.stride(0) if key_pos is not None else 0,
        num_kv_heads, groups, splits, scale * LOG2E,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_G=block_g, BLOCK_N=BLOCK_N,
        HAS_POS=key_pos is not None, IEEE=query.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    _combine_kernel[(batch * num_q_heads,)](
        o_part, lse_part, out, out.stride(0), out.stride(1), num_q_heads, groups, splits,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_G=block_g, BLOCK_S=triton.next_power_of_2(splits),
        num_warps=4,
    )
    return out
