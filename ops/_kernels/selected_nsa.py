"""Query-centric selected attention (the vanilla NSA kernel): one program per (query token, KV head).

A program holds the G query heads of its group ([BLOCK_G, D], G padded to >= 16 rows for tensor cores) and
loops over the token's ``topk`` selected blocks. Efficient when G is large (many rows per dot) and for
decode; at small G most of each dot is padding, which is what the FSA kernel fixes.

Inputs are contiguous: q [B, Tq, HQ, D], k [B, Tk, HKV, D], v [B, Tk, HKV, DV], indices [B, Tq, HKV, TOPK].
``query_row [Tq]`` is the row in k of each query token itself and ``sequence_start [Tq]`` the row where its
sequence starts; a key row r of block j is visible iff ``r <= query_row``.
"""

import triton
import triton.language as tl

from .common import (
    finish_softmax, fp32_scales, load_gradient_rows, masked_scores, online_softmax_step, repeats_earlier_slot,
)


@triton.jit
def _program(query_rows, sequence_starts, Tq, Tk, HKV: tl.constexpr):
    """This program's query token (b * Tq + t), KV head, the token's own row in k, its sequence start, and
    the first row of its batch row in k (b * Tk)."""
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    query_row = tl.load(query_rows + t).to(tl.int64)
    sequence_start = tl.load(sequence_starts + t).to(tl.int64)
    return b * Tq + t, bh % HKV, query_row, sequence_start, b * Tk


@triton.jit
def _selected_block(indices_row, slot, query_row, sequence_start, offs_s, BS: tl.constexpr, TOPK: tl.constexpr):
    """Key rows [BLOCK_S] of the selected block in ``slot`` and their mask; invalid slots (and repeats of an
    earlier slot) mask everything."""
    j = tl.load(indices_row + slot)
    valid = (j >= 0) & (j <= (query_row - sequence_start) // BS)
    valid = valid & ~repeats_earlier_slot(indices_row, 0, slot, j, True, TOPK)
    key_row = sequence_start + tl.where(valid, j, 0).to(tl.int64) * BS + offs_s
    # An invalid slot gets a limit no key row meets (folding it in avoids broadcasting a scalar bool).
    limit = tl.where(valid, query_row, -1)
    return key_row, (offs_s < BS) & (key_row <= limit)


@triton.jit
def _selected_attention_nsa_fwd_kernel(
    q, k, v, indices, query_rows, sequence_starts, o, lse, scale,
    Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    token, h, query_row, sequence_start, key_base = _program(query_rows, sequence_starts, Tq, Tk, HKV)
    _, qk_scale = fp32_scales(scale)

    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    head_mask = offs_g < G
    qv = tl.load(  # [BLOCK_G, BLOCK_D]
        q + (token * HQ + h * G + offs_g[:, None]) * D + offs_d[None, :],
        mask=head_mask[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    indices_row = indices + (token * HKV + h) * TOPK

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for slot in range(TOPK):
        key_row, key_mask = _selected_block(indices_row, slot, query_row, sequence_start, offs_s, BS, TOPK)
        kv_row = (key_base + key_row) * HKV + h
        kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
        s = masked_scores(qv, kt, key_mask[None, :], qk_scale, INPUT_PRECISION)  # [BLOCK_G, BLOCK_S]
        vv = tl.load(v + kv_row[:, None] * DV + offs_dv[None, :], mask=key_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, vv, INPUT_PRECISION)

    out, row_lse = finish_softmax(acc, m_i, l_i)
    tl.store(
        o + (token * HQ + h * G + offs_g[:, None]) * DV + offs_dv[None, :], out.to(o.dtype.element_ty),
        mask=head_mask[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(lse + token * HQ + h * G + offs_g, row_lse, mask=head_mask)


@triton.jit
def _selected_attention_nsa_bwd_kernel(
    q, k, v, do, lse, delta, indices, query_rows, sequence_starts, dq, dk, dv, scale,
    Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dq is written by the owning program; dk/dv (float32) are accumulated with atomics."""
    token, h, query_row, sequence_start, key_base = _program(query_rows, sequence_starts, Tq, Tk, HKV)
    scale, qk_scale = fp32_scales(scale)

    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    head_mask = offs_g < G
    heads = token * HQ + h * G + offs_g
    qv = tl.load(q + heads[:, None] * D + offs_d[None, :], mask=head_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    dov, lse2, row_delta = load_gradient_rows(do, lse, delta, heads, head_mask, DV, BLOCK_DV)
    indices_row = indices + (token * HKV + h) * TOPK

    dq_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for slot in range(TOPK):
        key_row, key_mask = _selected_block(indices_row, slot, query_row, sequence_start, offs_s, BS, TOPK)
        kv_row = (key_base + key_row) * HKV + h
        kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v + kv_row[None, :] * DV + offs_dv[:, None], mask=key_mask[None, :] & (offs_dv[:, None] < DV), other=0.0)
        mask = head_mask[:, None] & key_mask[None, :]
        s = masked_scores(qv, kt, mask, qk_scale, INPUT_PRECISION)
        p = tl.exp2(s - lse2[:, None])  # [BLOCK_G, BLOCK_S]
        dp = tl.dot(dov, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dq_acc += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION)
        dk_block = tl.dot(tl.trans(ds).to(qv.dtype), qv, input_precision=INPUT_PRECISION) * scale  # [BLOCK_S, BLOCK_D]
        dv_block = tl.dot(tl.trans(p).to(dov.dtype), dov, input_precision=INPUT_PRECISION)  # [BLOCK_S, BLOCK_DV]
        tl.atomic_add(dk + kv_row[:, None] * D + offs_d[None, :], dk_block, mask=key_mask[:, None] & (offs_d[None, :] < D), sem="relaxed")
        tl.atomic_add(dv + kv_row[:, None] * DV + offs_dv[None, :], dv_block, mask=key_mask[:, None] & (offs_dv[None, :] < DV), sem="relaxed")
    tl.store(
        dq + heads[:, None] * D + offs_d[None, :], (dq_acc * scale).to(dq.dtype.element_ty),
        mask=head_mask[:, None] & (offs_d[None, :] < D),
    )
