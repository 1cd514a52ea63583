"""KV-block-centric selected attention (the FSA kernels).

``ops/_index_inversion.py::invert_indices`` inverts the indices on the device: every valid (query token, KV
head, slot) entry gets the key ``(b * HKV + h) * Tk + first_row_of_its_block`` (``_selection_keys_kernel``);
entries are sorted by key and cut into work items of at most ``BLOCK_Q * TILES`` entries of one key. A program
takes one work item: it loads its KV block once and streams the entries through tensor-core dots ``BLOCK_Q`` at
a time; each step holds ``BLOCK_M = BLOCK_Q * GP`` query rows (``GP`` = G rounded up to a power of two), so the
dots are full at any G.

Forward: ``_selected_attention_fsa_fwd_kernel`` writes, per entry, the block's normalised partial output
``o_partial [E, G, DV]`` (input dtype) and its log-sum-exp ``lse_partial [E, G]`` (float32, -inf for empty
slots); ``_selected_attention_fsa_merge_kernel`` merges the ``TOPK`` partials of every (token, head) with a
max-shifted log-sum-exp.
Backward: ``_selected_attention_fsa_bwd_kernel`` recomputes p per step, writes each entry's dq contribution
``dq_partial [E, G, D]`` (input dtype), and keeps the work item's dk/dv in registers until one atomic add at the
end (deterministic mode: a store to the item's partial, summed per block in item order by
``_selected_attention_fsa_dkdv_sum_kernel``); ``_selected_attention_fsa_dq_sum_kernel`` adds the TOPK
contributions of every (token, head) in float32.
Partials rather than float32 dq atomics: the 16 scattered read-modify-writes of every dq row miss L2 and cost
twice the bytes of writing and reading a bf16 partial.

Work-item arrays (int32 [num_items]): ``item_keys``, ``item_starts`` (offset into ``sorted_entries``),
``item_lengths`` (0 for unused items). Entry e = ((b * Tq + t - first_token) * HKV + h) * TOPK + slot: both
passes run over chunks of flattened tokens to bound the partial buffers.
"""

import triton
import triton.language as tl

from .common import (
    finish_softmax, finite_or_zero, fp32_scales, load_gradient_rows, masked_scores, repeats_earlier_slot,
)


@triton.jit
def _is_read(block, t, query_rows, sequence_start, mask, BS: tl.constexpr):
    """Whether the selection of ``block`` by the query at position t of its batch row is attended: an index outside
    ``[0, t's own block]`` is ignored (treated as -1)."""
    last_block = (tl.load(query_rows + t, mask=mask, other=0) - sequence_start) // BS
    return mask & (block >= 0) & (block <= last_block)


@triton.jit
def _selection_keys_kernel(
    indices, query_rows, sequence_starts, keys, first_token, num_entries, invalid_key, Tq, Tk,
    HKV: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr,
):
    """keys [E]: the sort key of each entry of ``indices [N, HKV, TOPK]`` (the tokens from first_token), or
    ``invalid_key`` for -1 padding, out-of-range and future blocks and repeats of an earlier slot (never read)."""
    entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = entry < num_entries
    token = first_token + entry // (HKV * TOPK)  # b * Tq + t
    h = (entry // TOPK) % HKV
    t = token % Tq
    block = tl.load(indices + entry, mask=in_range, other=-1)
    sequence_start = tl.load(sequence_starts + t, mask=in_range, other=0).to(tl.int64)
    read = _is_read(block, t, query_rows, sequence_start, in_range, BS)
    read &= ~repeats_earlier_slot(indices, entry - entry % TOPK, entry % TOPK, block, in_range, TOPK)
    key = ((token // Tq) * HKV + h) * Tk + sequence_start + block.to(tl.int64) * BS
    key = tl.where(read, key, invalid_key)
    tl.store(keys + entry, key.to(keys.dtype.element_ty), mask=in_range)


@triton.jit
def _work_item(item_keys, item_starts, item_lengths, Tk, HKV: tl.constexpr, BLOCK_S: tl.constexpr, BS: tl.constexpr):
    """The work item's entry range and its KV block: rows (within the batch row) and flat [B*Tk*HKV] rows."""
    item = tl.program_id(0)
    key = tl.load(item_keys + item).to(tl.int64)
    start = tl.load(item_starts + item)
    length = tl.load(item_lengths + item)
    bh = key // Tk
    b = bh // HKV
    h = bh % HKV
    offs_s = tl.arange(0, BLOCK_S)
    key_row = key % Tk + offs_s
    key_mask = (offs_s < BS) & (key_row < Tk)  # the last block of a batch row may be partial
    return start, length, h, key_row, (b * Tk + key_row) * HKV + h, key_mask


@triton.jit
def _step_rows(
    sorted_entries, query_rows, step_start, step_end, h, key_row, key_mask, first_token, Tq,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Query rows of one step: entry ids, flat head rows of [B*Tq*HQ], row mask, and the causal mask."""
    offs_m = tl.arange(0, BLOCK_M)
    position = step_start + offs_m // GP
    g = offs_m % GP
    row_mask = (position < step_end) & (g < G)
    entry = tl.load(sorted_entries + position, mask=row_mask, other=0).to(tl.int64)
    token = first_token + entry // (HKV * TOPK)  # b * Tq + t
    query_row = tl.load(query_rows + token % Tq, mask=row_mask, other=0).to(tl.int64)
    head_row = token * HQ + h * G + g
    mask = row_mask[:, None] & key_mask[None, :] & (key_row[None, :] <= query_row[:, None])
    return entry, g, head_row, row_mask, mask


@triton.jit
def _selected_attention_fsa_fwd_kernel(
    q, k, v, item_keys, item_starts, item_lengths, sorted_entries, query_rows, o_partial, lse_partial, scale,
    first_token, Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    start, length, h, key_row, kv_row, key_mask = _work_item(item_keys, item_starts, item_lengths, Tk, HKV, BLOCK_S, BS)
    if length == 0:
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
    vv = tl.load(v + kv_row[:, None] * DV + offs_dv[None, :], mask=key_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    _, qk_scale = fp32_scales(scale)
    for step_start in range(start, start + length, BLOCK_M // GP):
        entry, g, head_row, row_mask, mask = _step_rows(
            sorted_entries, query_rows, step_start, start + length, h, key_row, key_mask, first_token, Tq,
            HQ, HKV, G, GP, TOPK, BLOCK_M,
        )
        qv = tl.load(q + head_row[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        s = masked_scores(qv, kt, mask, qk_scale, INPUT_PRECISION)  # [BLOCK_M, BLOCK_S]
        m = finite_or_zero(tl.max(s, 1))
        p = tl.exp2(s - m[:, None])
        out, block_lse = finish_softmax(tl.dot(p.to(vv.dtype), vv, input_precision=INPUT_PRECISION), m, tl.sum(p, 1))
        partial_row = entry * G + g
        tl.store(lse_partial + partial_row, block_lse, mask=row_mask)
        tl.store(
            o_partial + partial_row[:, None] * DV + offs_dv[None, :], out.to(o_partial.dtype.element_ty),
            mask=row_mask[:, None] & (offs_dv[None, :] < DV),
        )


@triton.jit
def _selected_attention_fsa_merge_kernel(
    o_partial, lse_partial, o, lse, first_token, num_tokens,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the TOPK partials of BLOCK_R // GP tokens of one KV head into o [B*Tq, HQ, DV], lse [B*Tq, HQ].

    Partials are numbered from the chunk's first token; o and lse rows are global."""
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    token = tl.program_id(0).to(tl.int64) * (BLOCK_R // GP) + offs_r // GP
    g = offs_r % GP
    row_mask = (token < num_tokens) & (g < G)
    first_entry = (token * HKV + h) * TOPK
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for slot in range(TOPK):
        partial_row = (first_entry + slot) * G + g
        part_lse = tl.load(lse_partial + partial_row, mask=row_mask, other=float("-inf"))
        seen = part_lse > float("-inf")
        part_o = tl.load(
            o_partial + partial_row[:, None] * DV + offs_dv[None, :],
            mask=(row_mask & seen)[:, None] & (offs_dv[None, :] < DV), other=0.0,
        ).to(tl.float32)
        m_new = tl.maximum(m, part_lse)
        m_safe = finite_or_zero(m_new)
        alpha = tl.exp(m - m_safe)
        weight = tl.exp(part_lse - m_safe)
        l = l * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * part_o
        m = m_new
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    row_lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    head_row = (first_token + token) * (HKV * G) + h * G + g
    tl.store(o + head_row[:, None] * DV + offs_dv[None, :], out.to(o.dtype.element_ty),
             mask=row_mask[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse + head_row, row_lse, mask=row_mask)


@triton.jit
def _selected_attention_fsa_bwd_kernel(
    q, k, v, do, lse, delta, item_keys, item_starts, item_lengths, sorted_entries, query_rows,
    dq_partial, dk, dv, dk_partial, dv_partial, scale,
    first_token, Tq, Tk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """dq partials per entry; dk/dv of the work item's KV block added to dk, dv (float32) with atomics, or, if
    DETERMINISTIC, written to the item's rows of dk_partial [items, BLOCK_S, BLOCK_D] / dv_partial
    [items, BLOCK_S, BLOCK_DV] for ``_selected_attention_fsa_dkdv_sum_kernel``."""
    start, length, h, key_row, kv_row, key_mask = _work_item(item_keys, item_starts, item_lengths, Tk, HKV, BLOCK_S, BS)
    if length == 0:
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
    vt = tl.load(v + kv_row[None, :] * DV + offs_dv[:, None], mask=key_mask[None, :] & (offs_dv[:, None] < DV), other=0.0)
    scale, qk_scale = fp32_scales(scale)
    dk_acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for step_start in range(start, start + length, BLOCK_M // GP):
        entry, g, head_row, row_mask, mask = _step_rows(
            sorted_entries, query_rows, step_start, start + length, h, key_row, key_mask, first_token, Tq,
            HQ, HKV, G, GP, TOPK, BLOCK_M,
        )
        qv = tl.load(q + head_row[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        dov, row_lse, row_delta = load_gradient_rows(do, lse, delta, head_row, row_mask, DV, BLOCK_DV)
        s = masked_scores(qv, kt, mask, qk_scale, INPUT_PRECISION)
        p = tl.exp2(s - row_lse[:, None])  # [BLOCK_M, BLOCK_S]
        dp = tl.dot(dov, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dq_step = tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION) * scale  # [BLOCK_M, BLOCK_D]
        tl.store(dq_partial + (entry * G + g)[:, None] * D + offs_d[None, :], dq_step.to(dq_partial.dtype.element_ty),
                 mask=row_mask[:, None] & (offs_d[None, :] < D))
        dk_acc += tl.dot(tl.trans(ds).to(qv.dtype), qv, input_precision=INPUT_PRECISION)
        dv_acc += tl.dot(tl.trans(p).to(dov.dtype), dov, input_precision=INPUT_PRECISION)
    if DETERMINISTIC:
        item_rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        tl.store(dk_partial + item_rows[:, None] * BLOCK_D + offs_d[None, :], dk_acc * scale)
        tl.store(dv_partial + item_rows[:, None] * BLOCK_DV + offs_dv[None, :], dv_acc)
    else:
        tl.atomic_add(dk + kv_row[:, None] * D + offs_d[None, :], dk_acc * scale, mask=key_mask[:, None] & (offs_d[None, :] < D), sem="relaxed")
        tl.atomic_add(dv + kv_row[:, None] * DV + offs_dv[None, :], dv_acc, mask=key_mask[:, None] & (offs_dv[None, :] < DV), sem="relaxed")


@triton.jit
def _selected_attention_fsa_dkdv_sum_kernel(
    dk_partial, dv_partial, item_keys, item_lengths, sequence_starts, dk, dv, num_items, Tk,
    HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr,
):
    """The deterministic dk/dv: dk, dv [B*Tk*HKV, D] (float32) += the sum, in item order, of the partials of the
    work items of one KV block. One program per item; the program of a block's first item does the sum, the
    others exit. Packed sequences: a block may reach into the next sequence, whose rows it leaves to their own
    blocks (it contributes zeros there)."""
    item = tl.program_id(0)
    key = tl.load(item_keys + item)
    length = tl.load(item_lengths + item)
    previous_key = tl.load(item_keys + item - 1, mask=item > 0, other=-1)
    previous_length = tl.load(item_lengths + item - 1, mask=item > 0, other=0)
    if (length == 0) | ((previous_key == key) & (previous_length > 0)):
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    current = item
    same_block = length > 0
    while same_block:
        item_rows = current.to(tl.int64) * BLOCK_S + offs_s
        dk_acc += tl.load(dk_partial + item_rows[:, None] * BLOCK_D + offs_d[None, :])
        dv_acc += tl.load(dv_partial + item_rows[:, None] * BLOCK_DV + offs_dv[None, :])
        current += 1
        more = current < num_items
        same_block = more & (tl.load(item_keys + current, mask=more, other=-1) == key) & (
            tl.load(item_lengths + current, mask=more, other=0) > 0
        )
    key = key.to(tl.int64)
    bh = key // Tk
    first_row = key % Tk
    key_row = first_row + offs_s
    key_mask = (offs_s < BS) & (key_row < Tk)
    if VARLEN:  # sequence_starts: the first key row of the sequence of every key row
        block_start = tl.load(sequence_starts + first_row)
        key_mask &= tl.load(sequence_starts + key_row, mask=key_mask, other=-1) == block_start
    kv_row = ((bh // HKV) * Tk + key_row) * HKV + bh % HKV
    dk_ptrs = dk + kv_row[:, None] * D + offs_d[None, :]
    dk_mask = key_mask[:, None] & (offs_d[None, :] < D)
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=dk_mask, other=0.0) + dk_acc, mask=dk_mask)
    dv_ptrs = dv + kv_row[:, None] * DV + offs_dv[None, :]
    dv_mask = key_mask[:, None] & (offs_dv[None, :] < DV)
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=dv_mask, other=0.0) + dv_acc, mask=dv_mask)


@triton.jit
def _selected_attention_fsa_dq_sum_kernel(
    dq_partial, selection_keys, dq, first_token, num_tokens, unread_key,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq [B*Tq, HQ, D] of BLOCK_R // GP tokens of one KV head: the float32 sum of their attended entries' rows of
    dq_partial (entries numbered from the chunk's first token); an entry is attended iff its selection key (from
    ``_selection_keys_kernel``) is not ``unread_key``."""
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    token = tl.program_id(0).to(tl.int64) * (BLOCK_R // GP) + offs_r // GP
    g = offs_r % GP
    row_mask = (token < num_tokens) & (g < G)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for slot in range(TOPK):
        entry = (token * HKV + h) * TOPK + slot
        read = tl.load(selection_keys + entry, mask=row_mask, other=unread_key) != unread_key
        acc += tl.load(
            dq_partial + (entry * G + g)[:, None] * D + offs_d[None, :], mask=read[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
    head_row = (first_token + token) * (HKV * G) + h * G + g
    tl.store(dq + head_row[:, None] * D + offs_d[None, :], acc.to(dq.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < D))
