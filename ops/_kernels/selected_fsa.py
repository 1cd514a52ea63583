"""KV-block-centric selected attention (the FSA kernels).

``ops/selected_attention.py::_invert_indices`` inverts the indices on the device: every valid (query token, KV
head, slot) entry gets the key ``(b * HKV + h) * Tk + first_row_of_its_block`` (``_selection_keys_kernel``);
entries are sorted by key and cut into work items of at most ``BLOCK_Q * TILES`` entries of one key. A program
takes one work item: it loads its KV block once and streams the entries through tensor-core dots ``BLOCK_Q`` at
a time; each step holds ``BLOCK_M = BLOCK_Q * GP`` query rows (``GP`` = G rounded up to a power of two), so the
dots are full at any G.

Forward: ``_selected_attention_fsa_fwd_kernel`` writes, per entry, the block's normalised partial output
``o_partial [E, G, DV]`` (input dtype) and its log-sum-exp ``lse_partial [E, G]`` (float32, -inf for empty
slots); ``_selected_attention_fsa_merge_kernel`` merges the ``TOPK`` partials of every (token, head) with a
max-shifted log-sum-exp. Block 0 and the two blocks ending at a query's own (NSA always selects them, and
neighbouring queries share them) skip that round trip through partials: ``_selected_attention_fsa_local_kernel``
attends them query-centrically for tiles of queries of one sequence and writes o, lse, into which the merge
folds the partials.
Backward: ``_selected_attention_fsa_bwd_kernel`` recomputes p per step, writes each entry's dq contribution
``dq_partial [E, G, D]`` (input dtype), and keeps the work item's dk/dv in registers until one atomic add at the
end; ``_selected_attention_fsa_dq_sum_kernel`` adds the TOPK contributions of every (token, head) in float32.
Partials rather than float32 dq atomics: the 16 scattered read-modify-writes of every dq row miss L2 and cost
twice the bytes of writing and reading a bf16 partial.

Work-item arrays (int32 [num_items]): ``item_keys``, ``item_starts`` (offset into ``sorted_entries``),
``item_lengths`` (0 for unused items). Entry e = ((b * Tq + t - first_token) * HKV + h) * TOPK + slot: both
passes run over chunks of flattened tokens to bound the partial buffers.
"""

import triton
import triton.language as tl

from .common import (
    finish_softmax, finite_or_zero, fp32_scales, load_gradient_rows, masked_scores, online_softmax_step,
)


@triton.jit
def _own_block(t, query_rows, sequence_start, mask, BS: tl.constexpr):
    """The block (of its sequence) that holds the query at position t of its batch row."""
    return (tl.load(query_rows + t, mask=mask, other=0) - sequence_start) // BS


@triton.jit
def _is_read(block, own_block, mask):
    """Whether a selected block is attended: an index outside ``[0, own block]`` is ignored (treated as -1)."""
    return mask & (block >= 0) & (block <= own_block)


@triton.jit
def _is_local(block, own_block):
    """Blocks the local kernel attends, query-centrically, in tiles of one sequence: block 0 and the two
    blocks ending at the query's own, which NSA always selects and which neighbouring queries share."""
    return (block == 0) | (block >= own_block - 1)


@triton.jit
def _tile_in_one_sequence(first, last, sequence_starts, Tq):
    """Whether the flattened tokens first..last lie in one batch row and one sequence."""
    same_row = (first // Tq) == (last // Tq)
    return same_row & (tl.load(sequence_starts + first % Tq) == tl.load(sequence_starts + last % Tq))


@triton.jit
def _selection_keys_kernel(
    indices, query_rows, sequence_starts, keys, first_token, num_entries, invalid_key, Tq, Tk,
    HKV: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr, LOCAL_TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    """keys [E]: the sort key of each entry of ``indices [N, HKV, TOPK]`` (the tokens from first_token), or
    ``invalid_key`` for -1 padding, out-of-range and future blocks (they are never read). With LOCAL_TILE > 0 the
    local blocks (``_is_local``) of queries whose local-kernel tile of LOCAL_TILE tokens lies in one sequence get
    ``invalid_key`` as well: the local kernel attends them."""
    entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = entry < num_entries
    local_token = entry // (HKV * TOPK)
    token = first_token + local_token  # b * Tq + t
    h = (entry // TOPK) % HKV
    t = token % Tq
    block = tl.load(indices + entry, mask=in_range, other=-1).to(tl.int64)
    sequence_start = tl.load(sequence_starts + t, mask=in_range, other=0).to(tl.int64)
    own_block = _own_block(t, query_rows, sequence_start, in_range, BS)
    read = _is_read(block, own_block, in_range)
    if LOCAL_TILE > 0:
        tile_first = local_token // LOCAL_TILE * LOCAL_TILE
        tile_last = tl.minimum(tile_first + LOCAL_TILE, num_entries // (HKV * TOPK)) - 1
        one_sequence = _tile_in_one_sequence(first_token + tile_first, first_token + tile_last, sequence_starts, Tq)
        read = read & ~(one_sequence & _is_local(block, own_block))
    key = ((token // Tq) * HKV + h) * Tk + sequence_start + block * BS
    tl.store(keys + entry, tl.where(read, key, invalid_key).to(keys.dtype.element_ty), mask=in_range)


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
def _local_attention(
    q, k, v, indices, query_rows, sequence_starts, scale, first_token, tile, token, h, g, row_mask, m_i, l_i, acc,
    Tq, Tk,
    HKV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_TOPK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Fold the selected local blocks (``_is_local``) of a tile of rows (tokens of one sequence) into the online
    softmax state (m_i base-2 max, l_i sum, acc [BLOCK_R, BLOCK_DV] unnormalised output), query-centrically: each
    candidate block is loaded once for the whole tile. ``tile`` and ``token`` count from the chunk's
    ``first_token``."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_TOPK)
    flat_token = first_token + token
    tile_first = first_token + tile
    t = flat_token % Tq
    sequence_start = tl.load(sequence_starts + t, mask=row_mask, other=0).to(tl.int64)
    query_row = tl.load(query_rows + t, mask=row_mask, other=0).to(tl.int64)
    own_block = (query_row - sequence_start) // BS
    selected = tl.load(indices + ((token * HKV + h) * TOPK)[:, None] + offs_k[None, :],
                       mask=row_mask[:, None] & (offs_k[None, :] < TOPK), other=-1)
    qv = tl.load(q + (flat_token * (HKV * G) + h * G + g)[:, None] * D + offs_d[None, :],
                 mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    _, qk_scale = fp32_scales(scale)
    # The tile's rows share the batch row and sequence: scalars from its first token.
    tile_start = tl.load(sequence_starts + tile_first % Tq).to(tl.int64)
    key_base = (tile_first // Tq) * Tk + tile_start  # flat row of the sequence's first key
    first_own = (tl.load(query_rows + tile_first % Tq) - tile_start) // BS
    last_own = tl.max(tl.where(row_mask, own_block, -1), 0)
    lowest = tl.maximum(first_own - 1, 0)
    # Candidates: block 0, then blocks lowest..last_own (step lowest - 1 stands for block 0 when lowest > 0).
    for step in range(lowest - 1, last_own + 1):
        block = tl.where(step == lowest - 1, 0, step)
        if (step >= 0) | (lowest > 0):
            member = (tl.sum((selected == block).to(tl.int32), 1) > 0) & (block <= own_block)
            member = member & _is_local(block, own_block) & row_mask
            if tl.max(member.to(tl.int32), 0) > 0:
                key_row = block * BS + offs_s
                key_mask = (offs_s < BS) & (tile_start + key_row < Tk)
                kv_row = (key_base + key_row) * HKV + h
                kt = tl.load(k + kv_row[None, :] * D + offs_d[:, None], mask=key_mask[None, :] & (offs_d[:, None] < D), other=0.0)
                vv = tl.load(v + kv_row[:, None] * DV + offs_dv[None, :], mask=key_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
                mask = member[:, None] & key_mask[None, :] & (tile_start + key_row[None, :] <= query_row[:, None])
                s = masked_scores(qv, kt, mask, qk_scale, INPUT_PRECISION)
                m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, vv, INPUT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _selected_attention_fsa_local_kernel(
    q, k, v, indices, query_rows, sequence_starts, o, lse, scale, first_token, num_tokens, Tq, Tk,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_TOPK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """o [B*Tq, HQ, DV], lse [B*Tq, HQ] of a tile of BLOCK_R // GP tokens of one KV head over their selected local
    blocks only, when the tile lies in one sequence (the KV-block-centric pass skipped those entries); 0 and -inf
    otherwise. The merge kernel then folds in the partials. ``indices [num_tokens, HKV, TOPK]`` count from the
    chunk's first token."""
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    tile = tl.program_id(0).to(tl.int64) * (BLOCK_R // GP)
    token = tile + offs_r // GP
    g = offs_r % GP
    row_mask = (token < num_tokens) & (g < G)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    tile_last = tl.minimum(tile + BLOCK_R // GP, num_tokens) - 1
    if _tile_in_one_sequence(first_token + tile, first_token + tile_last, sequence_starts, Tq):
        m, l, acc = _local_attention(
            q, k, v, indices, query_rows, sequence_starts, scale, first_token, tile, token, h, g, row_mask, m, l, acc,
            Tq, Tk, HKV, G, TOPK, BS, D, DV, BLOCK_R, BLOCK_S, BLOCK_D, BLOCK_DV, BLOCK_TOPK, INPUT_PRECISION,
        )
    out, row_lse = finish_softmax(acc, m, l)
    head_row = (first_token + token) * (HKV * G) + h * G + g
    tl.store(o + head_row[:, None] * DV + offs_dv[None, :], out.to(o.dtype.element_ty),
             mask=row_mask[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse + head_row, row_lse, mask=row_mask)


@triton.jit
def _selected_attention_fsa_merge_kernel(
    o_partial, lse_partial, o, lse, first_token, num_tokens,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the TOPK partials of BLOCK_R // GP tokens of one KV head into o [B*Tq, HQ, DV], lse [B*Tq, HQ], which
    hold the local kernel's result on entry (one more partial). Max-shifted log-sum-exp; entries without a partial
    have lse_partial = -inf.

    Partials are numbered from the chunk's first token; o and lse rows are global."""
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    token = tl.program_id(0).to(tl.int64) * (BLOCK_R // GP) + offs_r // GP
    g = offs_r % GP
    row_mask = (token < num_tokens) & (g < G)
    head_row = (first_token + token) * (HKV * G) + h * G + g
    out_offsets = head_row[:, None] * DV + offs_dv[None, :]
    out_mask = row_mask[:, None] & (offs_dv[None, :] < DV)
    m = tl.load(lse + head_row, mask=row_mask, other=float("-inf"))
    l = tl.where(m > float("-inf"), 1.0, 0.0)
    acc = tl.load(o + out_offsets, mask=out_mask & (m > float("-inf"))[:, None], other=0.0).to(tl.float32)
    first_entry = (token * HKV + h) * TOPK
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
    tl.store(o + out_offsets, out.to(o.dtype.element_ty), mask=out_mask)
    tl.store(lse + head_row, row_lse, mask=row_mask)


@triton.jit
def _selected_attention_fsa_bwd_kernel(
    q, k, v, do, lse, delta, item_keys, item_starts, item_lengths, sorted_entries, query_rows,
    dq_partial, dk, dv, scale,
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
    tl.atomic_add(dk + kv_row[:, None] * D + offs_d[None, :], dk_acc * scale, mask=key_mask[:, None] & (offs_d[None, :] < D), sem="relaxed")
    tl.atomic_add(dv + kv_row[:, None] * DV + offs_dv[None, :], dv_acc, mask=key_mask[:, None] & (offs_dv[None, :] < DV), sem="relaxed")


@triton.jit
def _selected_attention_fsa_dq_sum_kernel(
    dq_partial, indices, query_rows, sequence_starts, dq, first_token, num_tokens, Tq,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq [B*Tq, HQ, D] of BLOCK_R // GP tokens of one KV head: the float32 sum of their attended entries' rows of
    dq_partial (numbered from the chunk's first token, like ``indices [num_tokens, HKV, TOPK]``)."""
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    token = tl.program_id(0).to(tl.int64) * (BLOCK_R // GP) + offs_r // GP
    g = offs_r % GP
    row_mask = (token < num_tokens) & (g < G)
    t = (first_token + token) % Tq
    sequence_start = tl.load(sequence_starts + t, mask=row_mask, other=0).to(tl.int64)
    own_block = _own_block(t, query_rows, sequence_start, row_mask, BS)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for slot in range(TOPK):
        entry = (token * HKV + h) * TOPK + slot
        block = tl.load(indices + entry, mask=row_mask, other=-1)
        read = _is_read(block, own_block, row_mask)
        acc += tl.load(
            dq_partial + (entry * G + g)[:, None] * D + offs_d[None, :], mask=read[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
    head_row = (first_token + token) * (HKV * G) + h * G + g
    tl.store(dq + head_row[:, None] * D + offs_d[None, :], acc.to(dq.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < D))
