"""Split-KV decode attention in Triton over a quantized KV cache (int8, int4, fp8; layout in kv_quant.py).

The contract and the split scheme are triton_decode.py's (static shapes, the valid length in a device tensor, padding
marked by ``key_pos == -1``, splits sized from the SM count, a log-sum-exp merge by its `_combine_kernel`); what
differs is the key/value load: each block of codes is read with its groups' scales (and zeros) and dequantized in
registers, so no dequantized copy of the cache is ever written and a step reads 2-4x fewer bytes than bf16 would.
int4 bytes are split into nibbles and interleaved back to channel order in registers. The dequantized block is cast
to the query's dtype for ``tl.dot`` (fp32 queries: exact IEEE dots, as the tests use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .triton_decode import BLOCK_N, LOG2E, _combine_kernel, _num_splits

if TYPE_CHECKING:
    from ..kv_quant import KVQuantSpec, QuantizedKV

KIND_CODES = {"int8": 0, "int4": 1, "fp8": 2}
# the split kernel's launch: keys per inner step, warps and software-pipeline stages (scripts/sweep_quant_decode.py measures others)
LAUNCH = {"BLOCK_N": BLOCK_N, "num_warps": 4, "num_stages": 2}


@triton.jit
def _dequantize_block(
    DATA, SCALE, ZERO, s_n, ss_n, n, rows,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, KIND: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """fp32 ``[BLOCK_N, D_PAD]`` values of tokens ``n`` of one head; rows not in ``rows`` and pad channels are 0.

    ``GROUPED`` (a power-of-two group dividing ``D_PAD``): one scale (and zero) load per group, broadcast over its
    channels in registers; else one gathered load per channel (the scale repeated GROUP times), far more loads."""
    d = tl.arange(0, D_PAD)
    mask = rows[:, None] & (d < HEAD_DIM)[None, :]
    if KIND == 1:
        j = tl.arange(0, D_PAD // 2)
        packed = tl.load(DATA + n[:, None] * s_n + j[None, :], mask=rows[:, None] & (j < HEAD_DIM // 2)[None, :],
                         other=0)
        codes = tl.interleave(packed & 15, packed >> 4)  # channel 2j: low nibble of byte j, 2j + 1: high nibble
    else:
        codes = tl.load(DATA + n[:, None] * s_n + d[None, :], mask=mask, other=0.0)
    if GROUPED:
        gi = tl.arange(0, D_PAD // GROUP)
        gmask = rows[:, None] & (gi < HEAD_DIM // GROUP)[None, :]
        params = n[:, None] * ss_n + gi[None, :]
        scale = tl.load(SCALE + params, mask=gmask, other=0.0).to(tl.float32)
        values = tl.reshape(codes.to(tl.float32), (BLOCK_N, D_PAD // GROUP, GROUP)) * scale[:, :, None]
        if KIND != 2:
            values += tl.load(ZERO + params, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        return tl.reshape(values, (BLOCK_N, D_PAD))
    params = n[:, None] * ss_n + (d // GROUP)[None, :]
    values = codes.to(tl.float32) * tl.load(SCALE + params, mask=mask, other=0.0).to(tl.float32)
    if KIND != 2:
        values += tl.load(ZERO + params, mask=mask, other=0.0).to(tl.float32)
    return values


@triton.jit
def _quant_split_kernel(
    Q, K, K_SCALE, K_ZERO, V, V_SCALE, V_ZERO, LENGTH, POS, O_PART, LSE_PART,
    sq_b, sq_h, sk_b, sk_h, sk_n, sks_b, sks_h, sks_n, sv_b, sv_h, sv_n, svs_b, svs_h, svs_n, sp_b,
    num_kv_heads, groups, num_splits, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, KIND: tl.constexpr, HAS_POS: tl.constexpr, IEEE: tl.constexpr, GROUPED: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_kv_heads).to(tl.int64)  # 64-bit offsets, as in triton_decode.py
    h = (bh % num_kv_heads).to(tl.int64)
    length = tl.load(LENGTH)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D_PAD)
    q = tl.load(Q + b * sq_b + (h * groups + g)[:, None] * sq_h + d[None, :],
                mask=(g < groups)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D_PAD], tl.float32)
    k_off, ks_off = b * sk_b + h * sk_h, b * sks_b + h * sks_h
    v_off, vs_off = b * sv_b + h * sv_h, b * svs_b + h * svs_h
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = _dequantize_block(K + k_off, K_SCALE + ks_off, K_ZERO + ks_off, sk_n, sks_n, n, valid,
                              HEAD_DIM, D_PAD, GROUP, KIND, BLOCK_N, GROUPED).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_POS:
            valid = valid & (tl.load(POS + b * sp_b + n, mask=valid, other=-1) >= 0)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))  # also drops NaN from unwritten slots
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = _dequantize_block(V + v_off, V_SCALE + vs_off, V_ZERO + vs_off, sv_n, svs_n, n, valid,
                              HEAD_DIM, D_PAD, GROUP, KIND, BLOCK_N, GROUPED).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m = m_new
    row = (bh * num_splits + split) * BLOCK_G + g
    denom_safe = tl.where(denom > 0, denom, 1.0)
    tl.store(LSE_PART + row, tl.where(denom > 0, m + tl.log2(denom_safe), float("-inf")))
    tl.store(O_PART + row[:, None] * D_PAD + d[None, :], acc / denom_safe[:, None])


def _token_strides(t: torch.Tensor) -> tuple[int, int, int]:
    if t.stride(-1) != 1:
        raise ValueError("quantized KV buffers need a contiguous last dimension")
    return t.stride(0), t.stride(1), t.stride(2)


def triton_quant_decode_attention(
    query: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    spec: KVQuantSpec,
    length: torch.Tensor,
    key_pos: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``query [B, H_kv * G, 1, D]`` over quantized ``key/value [B, H_kv, capacity, *]`` (any token/head/batch
    strides; a zero shares its scale's strides); ``length`` is a 1-element int tensor on the device; ``key_pos [B,
    capacity]`` marks invalid keys with ``-1``. ``out``: where to write the ``[B, H_kv * G, 1, D]`` result (any
    strides). Keys past ``length`` are never read."""
    batch, num_q_heads, _, head_dim = query.shape
    num_kv_heads, capacity = key.data.shape[1], key.data.shape[2]
    spec.check(head_dim, query.device)
    for q in (key, value):
        if q.zero is not None and q.zero.stride() != q.scale.stride():
            raise ValueError("a zero tensor must have its scale tensor's strides")
    groups = num_q_heads // num_kv_heads
    block_g = max(16, triton.next_power_of_2(groups))  # tl.dot needs 16 rows
    d_pad = max(16, triton.next_power_of_2(head_dim))
    splits = _num_splits(query.device, batch * num_kv_heads, capacity)
    group = spec.group_size
    grouped = group & (group - 1) == 0 and d_pad % group == 0
    o_part = torch.empty(batch * num_kv_heads * splits * block_g, d_pad, dtype=torch.float32, device=query.device)
    lse_part = torch.empty(batch * num_kv_heads * splits * block_g, dtype=torch.float32, device=query.device)
    out = torch.empty_like(query) if out is None else out
    pos = key_pos if key_pos is not None else length  # any pointer: not read without HAS_POS
    k_zero = key.zero if key.zero is not None else key.scale  # fp8: not read
    v_zero = value.zero if value.zero is not None else value.scale
    _quant_split_kernel[(splits, batch * num_kv_heads)](
        query, key.data, key.scale, k_zero, value.data, value.scale, v_zero, length, pos, o_part, lse_part,
        query.stride(0), query.stride(1), *_token_strides(key.data), *_token_strides(key.scale),
        *_token_strides(value.data), *_token_strides(value.scale), pos.stride(0) if key_pos is not None else 0,
        num_kv_heads, groups, splits, scale * LOG2E,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_G=block_g, GROUP=spec.group_size,
        KIND=KIND_CODES[spec.kind], HAS_POS=key_pos is not None, IEEE=query.dtype == torch.float32,
        GROUPED=grouped, **LAUNCH,
    )
    _combine_kernel[(batch * num_q_heads,)](
        o_part, lse_part, out, out.stride(0), out.stride(1), num_q_heads, groups, splits,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_G=block_g, BLOCK_S=triton.next_power_of_2(splits),
        num_warps=4,
    )
    return out

