"""Split-KV decode attention in Triton over a quantized KV cache (int8, int4, fp8; layout in kv_quant.py).

The contract and the split scheme are triton_decode.py's (static shapes, the valid length in a device tensor, padding
marked by ``key_pos == -1``, splits sized from the SM count, a log-sum-exp merge by its `_combine_kernel`); what
differs is the key/value load: a block of codes is read with its groups' scales (and zeros), so no dequantized copy
of the cache is ever written and a step reads 2-4x fewer bytes than bf16 would.

Two kernels. `_folded_split_kernel` (every power-of-two group of at least 16 code bytes per token) never dequantizes:
a key's score is ``sum_G scale_G * (q_G . codes_G) + zero_G * sum(q_G)`` over its groups ``G``, so the codes go
straight into ``tl.dot`` (0..255 and fp8 values are exact in bf16/fp16) and the scales and zeros touch the
``[groups, query heads, keys]`` partial scores instead of every channel; values likewise, with ``p * scale_G`` as
the dot's left operand and ``p . zero_G`` on the side. The per-group dots are one dot of a block-diagonal query
(row ``(G, head)`` holds that head's channels of group ``G``, zero elsewhere) against all code bytes, which also fills
the 16 rows a tensor-core dot needs with real work at GQA 4 (4 groups x 4 heads) instead of padding. int4 bytes are
split into their low and high nibbles (even and odd channels), each with its own half of the query: no interleave.
On a GPU with bf16/fp16 queries (``LAUNCH["packed"]``) the nibbles become half values by packed bit operations
(`_nibbles`: two nibbles per 32-bit lane into a ``0x4300 | n`` / ``0x6400 | n`` pattern, then one packed fma
removes the offset), exact and 25% fewer instructions in the main loop than the integer-to-float path; the
interpreter (CPU) and fp32 queries keep the arithmetic conversion.
`_quant_split_kernel` dequantizes blocks in registers; it serves the other groups (e.g. 12 channels).
Both cast codes to the query's dtype for ``tl.dot`` (fp32 queries: exact IEEE dots, as the tests use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .triton_decode import BLOCK_N, LOG2E, _combine_kernel, _num_splits, _online_softmax, _split_range

if TYPE_CHECKING:
    from ..kv_quant import KVQuantSpec, QuantizedKV

KIND_CODES = {"int8": 0, "int4": 1, "fp8": 2}
# the split kernels' launch: keys per inner step, warps, software-pipeline stages, and two switches: whether the
# folded kernel serves the groups it can, and whether it converts int4 nibbles by packed bit operations on a GPU
# (scripts/sweep_quant_decode.py measures others)
LAUNCH = {"BLOCK_N": BLOCK_N, "num_warps": 4, "num_stages": 3, "folded": True, "packed": True}
SWITCHES = ("folded", "packed")
HALF_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _nibbles(codes, dtype: tl.constexpr):
    """int4 code bytes -> (low nibbles, high nibbles) in ``dtype`` (bf16 or fp16), exactly, two values per 32-bit
    instruction: a nibble ``x`` is or-ed into the mantissa of a power of two ``M`` (bf16 128, fp16 1024, whose ulp is
    1), giving ``M + x``, and ``M`` is subtracted in a packed fma. Four bytes per call (``pack=4``)."""
    if dtype == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, one, m;
            mov.b32 one, 0x3f803f80;
            mov.b32 m, 0xc300c300;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 $0, t0, 0x000f000f, 0x43004300, 0xea;
            lop3.b32 $1, t1, 0x000f000f, 0x43004300, 0xea;
            shr.b32 t0, t0, 4;
            shr.b32 t1, t1, 4;
            lop3.b32 $2, t0, 0x000f000f, 0x43004300, 0xea;
            lop3.b32 $3, t1, 0x000f000f, 0x43004300, 0xea;
            fma.rn.bf16x2 $0, $0, one, m;
            fma.rn.bf16x2 $1, $1, one, m;
            fma.rn.bf16x2 $2, $2, one, m;
            fma.rn.bf16x2 $3, $3, one, m;
            }""",
            constraints="=r,=r,=r,=r,r", args=[codes], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
        )
    else:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, one, m;
            mov.b32 one, 0x3c003c00;
            mov.b32 m, 0xe400e400;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 $0, t0, 0x000f000f, 0x64006400, 0xea;
            lop3.b32 $1, t1, 0x000f000f, 0x64006400, 0xea;
            shr.b32 t0, t0, 4;
            shr.b32 t1, t1, 4;
            lop3.b32 $2, t0, 0x000f000f, 0x64006400, 0xea;
            lop3.b32 $3, t1, 0x000f000f, 0x64006400, 0xea;
            fma.rn.f16x2 $0, $0, one, m;
            fma.rn.f16x2 $1, $1, one, m;
            fma.rn.f16x2 $2, $2, one, m;
            fma.rn.f16x2 $3, $3, one, m;
            }""",
            constraints="=r,=r,=r,=r,r", args=[codes], dtype=(tl.float16, tl.float16), is_pure=True, pack=4,
        )
    return lo, hi


@triton.jit
def _codes_as(codes, dtype: tl.constexpr, KIND: tl.constexpr, PACKED: tl.constexpr):
    """A block of code bytes as the dot's operands: (low nibbles, high nibbles) for int4, else (codes, codes)."""
    if KIND == 1 and PACKED:
        lo, hi = _nibbles(codes, dtype)
    elif KIND == 1:
        lo, hi = (codes & 15).to(dtype), (codes >> 4).to(dtype)
    else:
        lo = codes.to(dtype)
        hi = lo
    return lo, hi


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    """A masked load (0 where masked) only where ``MASKED``: unmasked loads carry no per-element predicates."""
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _folded_block(
    q_lo, q_hi, q_sum, m, denom, acc_lo, acc_hi, zero_acc, n0, end,
    k_base, ks_base, kz_base, v_base, vs_base, vz_base, pos_base, sk_n, sks_n, sv_n, svs_n, scale_log2,
    c, gi, c_ok, g_ok,
    ROWS: tl.constexpr, NG_PAD: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr,
    HAS_POS: tl.constexpr, IEEE: tl.constexpr, PACKED: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of ``BLOCK_N`` keys into the running softmax state. ``MASKED`` only for the block that crosses
    ``end`` (or when the groups are padded): full blocks load without masks, so without per-element predicates."""
    n = n0 + tl.arange(0, BLOCK_N)
    valid = n < end
    code_mask = valid[:, None] & c_ok[None, :]
    param_mask = g_ok[:, None] & valid[None, :]
    codes = _load(k_base + n[:, None] * sk_n + c[None, :], code_mask, MASKED)
    k_lo, k_hi = _codes_as(codes, q_lo.dtype, KIND, PACKED)
    part = _dot(q_lo, tl.trans(k_lo), tl.zeros([ROWS, BLOCK_N], tl.float32), IEEE)
    if KIND == 1:
        part = _dot(q_hi, tl.trans(k_hi), part, IEEE)
    params = gi[:, None] + n[None, :] * sks_n
    folded = tl.reshape(part, (NG_PAD, GQ_PAD, BLOCK_N))
    folded = folded * _load(ks_base + params, param_mask, MASKED).to(tl.float32)[:, None, :]
    if KIND != 2:
        folded += q_sum[:, :, None] * _load(kz_base + params, param_mask, MASKED).to(tl.float32)[:, None, :]
    s = tl.sum(folded, 0)
    if HAS_POS:
        valid = valid & (tl.load(pos_base + n, mask=valid, other=-1) >= 0)
    if MASKED or HAS_POS:
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))  # also drops NaN from unwritten slots
    else:
        s = s * scale_log2
    p, alpha, m_new, denom = _online_softmax(s, m, denom)
    # values: padded keys are masked out of the loads too (their weight is 0, but 0 * NaN is not)
    V_MASKED: tl.constexpr = MASKED or HAS_POS
    code_mask = valid[:, None] & c_ok[None, :]
    param_mask = g_ok[:, None] & valid[None, :]
    params = gi[:, None] + n[None, :] * svs_n
    p_scaled = p[None, :, :] * _load(vs_base + params, param_mask, V_MASKED).to(tl.float32)[:, None, :]
    p_scaled = tl.reshape(p_scaled, (ROWS, BLOCK_N)).to(q_lo.dtype)
    codes = _load(v_base + n[:, None] * sv_n + c[None, :], code_mask, V_MASKED)
    v_lo, v_hi = _codes_as(codes, q_lo.dtype, KIND, PACKED)
    alpha_rows = tl.reshape(tl.broadcast_to(alpha[None, :], (NG_PAD, GQ_PAD)), (ROWS,))[:, None]
    acc_lo = _dot(p_scaled, v_lo, acc_lo * alpha_rows, IEEE)
    if KIND == 1:
        acc_hi = _dot(p_scaled, v_hi, acc_hi * alpha_rows, IEEE)
    if KIND != 2:
        v_zero = _load(vz_base + params, param_mask, V_MASKED).to(tl.float32)
        zero_acc = zero_acc * alpha[None, :] + tl.sum(p[None, :, :] * v_zero[:, None, :], 2)
    return m_new, denom, acc_lo, acc_hi, zero_acc


@triton.jit
def _folded_split_kernel(
    Q, K, K_SCALE, K_ZERO, V, V_SCALE, V_ZERO, LENGTH, POS, O_PART, LSE_PART,
    sq_b, sq_h, sk_b, sk_h, sk_n, sks_b, sks_h, sks_n, sv_b, sv_h, sv_n, svs_b, svs_h, svs_n, sp_b,
    num_kv_heads, groups, num_splits, scale_log2,
    D_PAD: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, NG_PAD: tl.constexpr, GQ_PAD: tl.constexpr,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr, HAS_POS: tl.constexpr, IEEE: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Rows ``r = G * GQ_PAD + head``: ``ROWS = NG_PAD * GQ_PAD``; columns ``c = G * HALF + j`` of the ``KW = NG_PAD *
    HALF`` code bytes (int4: a byte holds channels ``2j, 2j + 1`` of group ``G``; else ``HALF = GROUP``)."""
    ROWS: tl.constexpr = NG_PAD * GQ_PAD
    KW: tl.constexpr = NG_PAD * HALF
    split, bh, b, h, start, end = _split_range(LENGTH, num_kv_heads, num_splits, BLOCK_N)

    r = tl.arange(0, ROWS)
    r_group, r_head = r // GQ_PAD, r % GQ_PAD
    c = tl.arange(0, KW)
    c_group = c // HALF
    if KIND == 1:
        channel = c_group * GROUP + 2 * (c % HALF)  # the low nibble's channel; the high one is the next
    else:
        channel = c_group * GROUP + c % HALF
    diagonal = (r_group[:, None] == c_group[None, :]) & (r_group < NG)[:, None]
    q_ptr = Q + b * sq_b + (h * groups + r_head)[:, None] * sq_h + channel[None, :]
    q_mask = diagonal & (r_head < groups)[:, None]
    q_lo = tl.load(q_ptr, mask=q_mask, other=0.0)
    q_sum = tl.sum(q_lo.to(tl.float32), 1)
    q_hi = q_lo
    if KIND == 1:
        q_hi = tl.load(q_ptr + 1, mask=q_mask, other=0.0)
        q_sum += tl.sum(q_hi.to(tl.float32), 1)
    q_sum = tl.reshape(q_sum, (NG_PAD, GQ_PAD))

    gi = tl.arange(0, NG_PAD)
    # padded groups (NG < NG_PAD) are masked out of every load; without them, full blocks load unmasked
    c_ok = c_group < NG
    g_ok = gi < NG
    m = tl.full([GQ_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GQ_PAD], tl.float32)
    acc_lo = tl.zeros([ROWS, KW], tl.float32)
    acc_hi = tl.zeros([ROWS, KW], tl.float32)
    zero_acc = tl.zeros([NG_PAD, GQ_PAD], tl.float32)
    k_base, ks_base = K + b * sk_b + h * sk_h, K_SCALE + b * sks_b + h * sks_h
    kz_base = K_ZERO + b * sks_b + h * sks_h
    v_base, vs_base = V + b * sv_b + h * sv_h, V_SCALE + b * svs_b + h * svs_h
    vz_base = V_ZERO + b * svs_b + h * svs_h
    pos_base = POS + b * sp_b
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        m, denom, acc_lo, acc_hi, zero_acc = _folded_block(
            q_lo, q_hi, q_sum, m, denom, acc_lo, acc_hi, zero_acc, n0, end,
            k_base, ks_base, kz_base, v_base, vs_base, vz_base, pos_base, sk_n, sks_n, sv_n, svs_n, scale_log2,
            c, gi, c_ok, g_ok, ROWS, NG_PAD, GQ_PAD, BLOCK_N, KIND, HAS_POS, IEEE, PACKED, NG < NG_PAD,
        )  # fmt: skip
    # the block that crosses ``end``, if any: a loop of at most one step (an ``if`` here costs 40 more registers)
    for n_tail in range(full_end, end, BLOCK_N):
        m, denom, acc_lo, acc_hi, zero_acc = _folded_block(
            q_lo, q_hi, q_sum, m, denom, acc_lo, acc_hi, zero_acc, n_tail, end,
            k_base, ks_base, kz_base, v_base, vs_base, vz_base, pos_base, sk_n, sks_n, sv_n, svs_n, scale_log2,
            c, gi, c_ok, g_ok, ROWS, NG_PAD, GQ_PAD, BLOCK_N, KIND, HAS_POS, IEEE, PACKED, True,
        )  # fmt: skip
    heads = (bh * num_splits + split) * GQ_PAD + tl.arange(0, GQ_PAD)
    denom_safe = tl.where(denom > 0, denom, 1.0)
    tl.store(LSE_PART + heads, tl.where(denom > 0, m + tl.log2(denom_safe), float("-inf")))
    # row (G, head) of the accumulators holds that head's channels of group G in its diagonal block
    denom_rows = tl.reshape(tl.broadcast_to(denom_safe[None, :], (NG_PAD, GQ_PAD)), (ROWS,))[:, None]
    zero_rows = tl.reshape(zero_acc, (ROWS,))[:, None]
    out = O_PART + ((bh * num_splits + split) * GQ_PAD + r_head)[:, None] * D_PAD + channel[None, :]
    tl.store(out, (acc_lo + zero_rows) / denom_rows, mask=diagonal)
    if KIND == 1:
        tl.store(out + 1, (acc_hi + zero_rows) / denom_rows, mask=diagonal)


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
    split, bh, b, h, start, end = _split_range(LENGTH, num_kv_heads, num_splits, BLOCK_N)

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
        p, alpha, m_new, denom = _online_softmax(s, m, denom)
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
    d_pad = max(16, triton.next_power_of_2(head_dim))
    splits = _num_splits(query.device, batch * num_kv_heads, capacity)
    group = spec.group_size
    half = group // 2 if spec.kind == "int4" else group  # code bytes (elements) per group and token
    num_groups = head_dim // group
    pow2 = group & (group - 1) == 0
    folded = LAUNCH["folded"] and pow2 and triton.next_power_of_2(num_groups) * half >= 16
    if folded:
        ng_pad = triton.next_power_of_2(num_groups)
        block_g = max(triton.next_power_of_2(groups), -(-16 // ng_pad))  # rows of the dot: ng_pad * block_g >= 16
    else:
        block_g = max(16, triton.next_power_of_2(groups))  # tl.dot needs 16 rows
    o_part = torch.empty(batch * num_kv_heads * splits * block_g, d_pad, dtype=torch.float32, device=query.device)
    lse_part = torch.empty(batch * num_kv_heads * splits * block_g, dtype=torch.float32, device=query.device)
    out = torch.empty_like(query) if out is None else out
    pos = key_pos if key_pos is not None else length  # any pointer: not read without HAS_POS
    k_zero = key.zero if key.zero is not None else key.scale  # fp8: not read
    v_zero = value.zero if value.zero is not None else value.scale
    args = (
        query, key.data, key.scale, k_zero, value.data, value.scale, v_zero, length, pos, o_part, lse_part,
        query.stride(0), query.stride(1), *_token_strides(key.data), *_token_strides(key.scale),
        *_token_strides(value.data), *_token_strides(value.scale), pos.stride(0) if key_pos is not None else 0,
        num_kv_heads, groups, splits, scale * LOG2E,
    )  # fmt: skip
    common = {"KIND": KIND_CODES[spec.kind], "HAS_POS": key_pos is not None, "IEEE": query.dtype == torch.float32,
              "GROUP": group, "D_PAD": d_pad, **{k: v for k, v in LAUNCH.items() if k not in SWITCHES}}  # fmt: skip
    if folded:
        # the packed conversion is PTX: compiled code on a GPU only (the interpreter runs the arithmetic one)
        packed = LAUNCH["packed"] and spec.kind == "int4" and query.is_cuda and query.dtype in HALF_DTYPES
        _folded_split_kernel[(splits, batch * num_kv_heads)](
            *args, NG=num_groups, NG_PAD=ng_pad, GQ_PAD=block_g, HALF=half, PACKED=packed, **common
        )
    else:
        _quant_split_kernel[(splits, batch * num_kv_heads)](
            *args, HEAD_DIM=head_dim, BLOCK_G=block_g, GROUPED=pow2 and d_pad % group == 0, **common
        )
    _combine_kernel[(batch * num_q_heads,)](
        o_part, lse_part, out, out.stride(0), out.stride(1), num_q_heads, groups, splits,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_G=block_g, BLOCK_S=triton.next_power_of_2(splits),
        num_warps=4,
    )
    return out
