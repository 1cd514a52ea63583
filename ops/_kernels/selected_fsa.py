"""KV-block-centric selected attention (the FSA kernels).

The host inverts the indices (``ops/selected_attention.py::_invert_indices``): every valid (query token, KV
head, slot) entry gets the key ``(b * HKV + h) * Tk + first_row_of_its_block``; entries are sorted by key and
cut into tiles of at most ``BLOCK_Q`` entries of one key. A program takes one tile: it loads its KV block
once and runs the ``BLOCK_Q * G`` query rows that chose it through tensor-core dots (``BLOCK_M = BLOCK_Q * GP``
rows, ``GP`` = G rounded up to a power of two), so the dots are full at any G.

Forward, in two passes that need no per-entry output buffer:
  1. ``_selected_attention_fsa_fwd_kernel_lse``: the log-sum-exp of each entry's block -> ``entry_lse [E, G]``;
     the host merges them per query (``logsumexp`` over the slots) into the final ``lse``.
  2. ``_selected_attention_fsa_fwd_kernel_out``: ``p = exp(s - lse)`` is already normalised, so each tile
     adds ``p @ V`` into a float32 ``o`` with atomics.
Backward: ``_selected_attention_fsa_bwd_kernel`` recomputes p per tile and adds into float32 dq, dk, dv.

Tile arrays (int32 [num_tiles]): ``tile_keys`` (-1 for unused tiles), ``tile_starts`` (offset into
``sorted_entries``), ``tile_lengths`` (0..BLOCK_Q). Entry e = ((b * Tq + t) * HKV + h) * TOPK + slot.
"""

import triton
import triton.language as tl

from .common import finite_or_zero, masked_scores


@triton.jit
def _tile(
    tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows, q, Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
):
    """Everything a tile program needs about its KV block and its query rows."""
    tile = tl.program_id(0)
    key = tl.load(tile_keys + tile).to(tl.int64)
    start = tl.load(tile_starts + tile)
    length = tl.load(tile_lengths + tile)
    bh = key // Tk
    b = bh // HKV
    h = bh % HKV
    first_row = key % Tk

    offs_m = tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    slot_in_tile = offs_m // GP
    g = offs_m % GP
    row_mask = (slot_in_tile < length) & (g < G)
    entry = tl.load(sorted_entries + start + slot_in_tile, mask=row_mask, other=0).to(tl.int64)
    token = entry // (HKV * TOPK)  # b * Tq + t
    t = token % Tq
    query_row = tl.load(query_rows + t, mask=row_mask, other=0).to(tl.int64)
    head_row = token * HQ + h * G + g  # row of [B * Tq * HQ]
    qv = tl.load(q + head_row[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)

    key_row = first_row + offs_s  # within the batch row
    kv_row = (b * Tk + key_row) * HKV + h
    key_mask = (offs_s < BS) & (key_row < Tk)  # the last block of a batch row may be partial
    mask = row_mask[:, None] & key_mask[None, :] & (key_row[None, :] <= query_row[:, None])
    return key, length, entry, head_row, row_mask, qv, kv_row, key_mask, mask


@triton.jit
def _selected_attention_fsa_fwd_kernel_lse(
    q, k, tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows, entry_lse, scale,
    Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    key, length, entry, head_row, row_mask, qv, kv_row, key_mask, mask = _tile(
        tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows, q, Tq, Tk,
        HQ, HKV, G, GP, TOPK, D, BLOCK_M, BLOCK_S, BLOCK_D, BS,
    )
    if length == 0:
        return
    offs_d = tl.arange(0, BLOCK_D)
    kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
    s = masked_scores(qv, kt, mask, scale * 1.4426950408889634, INPUT_PRECISION)  # [BLOCK_M, BLOCK_S]
    m = tl.max(s, 1)
    m_safe = finite_or_zero(m)
    l = tl.sum(tl.exp2(s - m_safe[:, None]), 1)
    block_lse = tl.where(l > 0, (m_safe + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
    g = tl.arange(0, BLOCK_M) % GP
    tl.store(entry_lse + entry * G + g, block_lse, mask=row_mask)


@triton.jit
def _selected_attention_fsa_fwd_kernel_out(
    q, k, v, tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows, lse, o_acc, scale,
    Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    key, length, entry, head_row, row_mask, qv, kv_row, key_mask, mask = _tile(
        tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows, q, Tq, Tk,
        HQ, HKV, G, GP, TOPK, D, BLOCK_M, BLOCK_S, BLOCK_D, BS,
    )
    if length == 0:
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
    s = masked_scores(qv, kt, mask, scale * 1.4426950408889634, INPUT_PRECISION)
    row_lse = finite_or_zero(tl.load(lse + head_row, mask=row_mask, other=0.0)) * 1.4426950408889634
    p = tl.exp2(s - row_lse[:, None])
    vv = tl.load(v + kv_row[:, None] * DV + offs_dv[None, :], mask=key_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.dot(p.to(vv.dtype), vv, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_DV]
    tl.atomic_add(o_acc + head_row[:, None] * DV + offs_dv[None, :], out, mask=row_mask[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _selected_attention_fsa_bwd_kernel(
    q, k, v, do, lse, delta, tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows,
    dq, dk, dv, scale,
    Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    key, length, entry, head_row, row_mask, qv, kv_row, key_mask, mask = _tile(
        tile_keys, tile_starts, tile_lengths, sorted_entries, query_rows, q, Tq, Tk,
        HQ, HKV, G, GP, TOPK, D, BLOCK_M, BLOCK_S, BLOCK_D, BS,
    )
    if length == 0:
        return

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
    vt = tl.load(v + kv_row[None, :] * DV + offs_dv[:, None], mask=key_mask[None, :] & (offs_dv[:, None] < DV), other=0.0)
    dov = tl.load(do + head_row[:, None] * DV + offs_dv[None, :], mask=row_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    row_lse = finite_or_zero(tl.load(lse + head_row, mask=row_mask, other=0.0)) * 1.4426950408889634
    row_delta = tl.load(delta + head_row, mask=row_mask, other=0.0)

    s = masked_scores(qv, kt, mask, scale * 1.4426950408889634, INPUT_PRECISION)
    p = tl.exp2(s - row_lse[:, None])  # [BLOCK_M, BLOCK_S]
    dp = tl.dot(dov, vt, input_precision=INPUT_PRECISION)
    ds = p * (dp - row_delta[:, None])
    dq_tile = tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION) * scale  # [BLOCK_M, BLOCK_D]
    tl.atomic_add(dq + head_row[:, None] * D + offs_d[None, :], dq_tile, mask=row_mask[:, None] & (offs_d[None, :] < D))
    dk_block = tl.dot(tl.trans(ds).to(qv.dtype), qv, input_precision=INPUT_PRECISION) * scale  # [BLOCK_S, BLOCK_D]
    dv_block = tl.dot(tl.trans(p).to(dov.dtype), dov, input_precision=INPUT_PRECISION)  # [BLOCK_S, BLOCK_DV]
    tl.atomic_add(dk + kv_row[:, None] * D + offs_d[None, :], dk_block, mask=key_mask[:, None] & (offs_d[None, :] < D))
    tl.atomic_add(dv + kv_row[:, None] * DV + offs_dv[None, :], dv_block, mask=key_mask[:, None] & (offs_dv[None, :] < DV))
