"""Flash attention over one contiguous key range per query: the kernels of compressed and window attention.

Both ops see, from the query token t, a contiguous span of key rows ``key_lo[t] <= j < key_hi[t]``
(window: the last ``window_size`` tokens; compressed: the compressed keys whose whole window is in t's past),
and both spans only move forward with t. So one masked flash-attention family serves both; the ops differ only
in the tables they build (``ops/_masked_attention.py``).

Layout (contiguous): q [B, Tq, HQ, D], k [B, Tk, HKV, D], v [B, Tk, HKV, DV], lse/delta [B, Tq, HQ] float32.
Tables are int32 rows within one batch row: key_lo/key_hi [Tq], or [B, Tq] per batch row (``span_stride`` = Tq,
else 0: a batch of caches of different fills); for the backward also query_lo/query_hi [Tk] (or [B, Tk],
``query_span_stride``), the span of query tokens that see key j. A program works on one KV head and packs the G query heads of the
group into its rows (row r = token ``r // GP``, head ``r % GP``), so each K/V tile it loads serves all G heads.

- forward: program = (tile of BLOCK_M // GP tokens, batch * KV head, key split); online softmax over its key span,
  or over the ``split_len`` keys of split ``program_id(2)`` of it (few long spans: decode), each split writing
  float32 partials ``o, lse [splits, B, Tq, HQ, ...]`` that the launcher merges.
- backward: ``dq`` like the forward; ``dk, dv`` one program per tile of BLOCK_N keys looping over the tokens
  that see them, or over one chunk of them when their span is long (compressed keys are seen by up to all
  tokens: without chunks, few long programs would leave most SMs idle). Chunks write float32 partial sums
  that the launcher adds in a fixed order. No atomics: deterministic.
"""

import triton
import triton.language as tl

from .common import finish_softmax, fp32_scales, load_gradient_rows, masked_scores, online_softmax_step


# The index helpers take no pointer: Inductor's mutation analysis of a user kernel counts every tensor passed
# to a helper whose result feeds a store address as written, and would clone it (q!) before each launch.
@triton.jit
def _query_tile(first_token, bh, Tq, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """BLOCK_M query rows from first_token on, in batch row and KV head bh: batch row, KV head, token [BLOCK_M]
    and flat (token, head) row of each, validity."""
    b, h = (bh // HKV).to(tl.int64), bh % HKV
    offs_m = tl.arange(0, BLOCK_M)
    token = first_token + offs_m // GP
    head = offs_m % GP
    rows = (b * Tq + token) * HQ + h * G + head
    return b, h, token, rows, (token < Tq) & (head < G)


@triton.jit
def _load_query_tile(q, key_lo, key_hi, token, rows, row_valid, Tq, Tk, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """q [BLOCK_M, BLOCK_D] and each row's key span. Rows past Tq get the empty span [Tk, 0): they neither widen
    the key loop nor see a key."""
    offs_d = tl.arange(0, BLOCK_D)
    qv = tl.load(q + rows[:, None] * D + offs_d[None, :], mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    lo_row = tl.load(key_lo + token, mask=token < Tq, other=Tk)
    hi_row = tl.load(key_hi + token, mask=token < Tq, other=0)
    return lo_row, hi_row, qv


@triton.jit
def _masked_attention_fwd_kernel(
    q, k, v, key_lo, key_hi, o, lse, scale, Tq, Tk, span_stride, split_len,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    b, h, token, rows, row_valid = _query_tile(
        tl.program_id(0) * (BLOCK_M // GP), tl.program_id(1), Tq, HQ, HKV, G, GP, BLOCK_M
    )
    lo_row, hi_row, qv = _load_query_tile(q, key_lo + b * span_stride, key_hi + b * span_stride, token, rows,
                                          row_valid, Tq, Tk, D, BLOCK_D)
    split = tl.program_id(2)
    lo_row = lo_row + split * split_len  # split_len = 0: one split, the whole span
    hi_row = tl.where(split_len > 0, tl.minimum(hi_row, lo_row + split_len), hi_row)
    rows += split.to(tl.int64) * (tl.num_programs(1) // HKV) * Tq * HQ  # split s writes partials [s]
    _, qk_scale = fp32_scales(scale)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_rows = b * Tk * HKV + h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(tl.min(lo_row, 0), tl.max(hi_row, 0), BLOCK_N):
        keys = start + offs_n
        key_rows = kv_rows + keys.to(tl.int64) * HKV
        in_range = keys < Tk
        kt = tl.load(k + key_rows[None, :] * D + offs_d[:, None], mask=in_range[None, :] & (offs_d[:, None] < D), other=0.0)
        visible = (keys[None, :] >= lo_row[:, None]) & (keys[None, :] < hi_row[:, None])
        s = masked_scores(qv, kt, visible, qk_scale, INPUT_PRECISION)
        vv = tl.load(v + key_rows[:, None] * DV + offs_dv[None, :], mask=in_range[:, None] & (offs_dv[None, :] < DV), other=0.0)
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, vv, INPUT_PRECISION)

    out, row_lse = finish_softmax(acc, m_i, l_i)
    tl.store(o + rows[:, None] * DV + offs_dv[None, :], out.to(o.dtype.element_ty),
             mask=row_valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse + rows, row_lse, mask=row_valid)


@triton.jit
def _masked_attention_bwd_dq_kernel(
    q, k, v, do, lse, delta, key_lo, key_hi, dq, scale, Tq, Tk, span_stride,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    b, h, token, rows, row_valid = _query_tile(
        tl.program_id(0) * (BLOCK_M // GP), tl.program_id(1), Tq, HQ, HKV, G, GP, BLOCK_M
    )
    lo_row, hi_row, qv = _load_query_tile(q, key_lo + b * span_stride, key_hi + b * span_stride, token, rows,
                                          row_valid, Tq, Tk, D, BLOCK_D)
    scale, qk_scale = fp32_scales(scale)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dov, lse2, row_delta = load_gradient_rows(do, lse, delta, rows, row_valid, DV, BLOCK_DV)
    kv_rows = b * Tk * HKV + h

    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(tl.min(lo_row, 0), tl.max(hi_row, 0), BLOCK_N):
        keys = start + offs_n
        key_rows = kv_rows + keys.to(tl.int64) * HKV
        in_range = keys < Tk
        kt = tl.load(k + key_rows[None, :] * D + offs_d[:, None], mask=in_range[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v + key_rows[None, :] * DV + offs_dv[:, None], mask=in_range[None, :] & (offs_dv[:, None] < DV), other=0.0)
        visible = row_valid[:, None] & (keys[None, :] >= lo_row[:, None]) & (keys[None, :] < hi_row[:, None])
        p = tl.exp2(masked_scores(qv, kt, visible, qk_scale, INPUT_PRECISION) - lse2[:, None])
        dp = tl.dot(dov, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dq_acc += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION)
    tl.store(dq + rows[:, None] * D + offs_d[None, :], (dq_acc * scale).to(dq.dtype.element_ty),
             mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _masked_attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, key_lo, key_hi, query_lo, query_hi, dk, dv, scale, Tq, Tk, chunk_tokens, span_stride,
    query_span_stride,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = (bh // HKV).to(tl.int64), bh % HKV
    scale, qk_scale = fp32_scales(scale)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = keys < Tk
    key_rows = b * Tk * HKV + h + keys.to(tl.int64) * HKV
    kt = tl.load(k + key_rows[None, :] * D + offs_d[:, None], mask=in_range[None, :] & (offs_d[:, None] < D), other=0.0)
    vt = tl.load(v + key_rows[None, :] * DV + offs_dv[:, None], mask=in_range[None, :] & (offs_dv[:, None] < DV), other=0.0)
    # The tokens that see these keys, or this program's chunk of them (program_id(2); chunk_tokens is a multiple
    # of the tokens per step, so the chunks split the same steps as one loop would).
    chunk = tl.program_id(2)
    query_lo += b * query_span_stride
    query_hi += b * query_span_stride
    first = tl.min(tl.load(query_lo + keys, mask=in_range, other=Tq), 0) + chunk * chunk_tokens
    last = tl.minimum(tl.max(tl.load(query_hi + keys, mask=in_range, other=0), 0), first + chunk_tokens)

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for token_start in range(first, last, BLOCK_M // GP):
        _, _, token, rows, row_valid = _query_tile(token_start, bh, Tq, HQ, HKV, G, GP, BLOCK_M)
        lo_row, hi_row, qv = _load_query_tile(q, key_lo + b * span_stride, key_hi + b * span_stride, token, rows,
                                              row_valid, Tq, Tk, D, BLOCK_D)
        dov, lse2, row_delta = load_gradient_rows(do, lse, delta, rows, row_valid, DV, BLOCK_DV)
        visible = row_valid[:, None] & (keys[None, :] >= lo_row[:, None]) & (keys[None, :] < hi_row[:, None])
        p = tl.exp2(masked_scores(qv, kt, visible, qk_scale, INPUT_PRECISION) - lse2[:, None])  # [M, N]
        dp = tl.dot(dov, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dv_acc += tl.dot(tl.trans(p).to(dov.dtype), dov, input_precision=INPUT_PRECISION)
        dk_acc += tl.dot(tl.trans(ds).to(qv.dtype), qv, input_precision=INPUT_PRECISION)
    # Chunk c writes slice c of dk/dv [chunks, B, Tk, HKV, D] (one chunk: dk/dv themselves).
    chunk_rows = chunk.to(tl.int64) * tl.num_programs(1) * Tk
    tl.store(dk + (chunk_rows + key_rows[:, None]) * D + offs_d[None, :], (dk_acc * scale).to(dk.dtype.element_ty),
             mask=in_range[:, None] & (offs_d[None, :] < D))
    tl.store(dv + (chunk_rows + key_rows[:, None]) * DV + offs_dv[None, :], dv_acc.to(dv.dtype.element_ty),
             mask=in_range[:, None] & (offs_dv[None, :] < DV))
