"""Fused block selection: compressed scores -> group-summed probabilities -> block scores -> top-k, in registers.

One program owns a tile of BLOCK_T query tokens of one sequence and one KV head (rows = tokens x GP heads,
as in the attention kernels). It walks the causal key blocks in steps of NBT blocks; for each step it
recomputes the probabilities of the compressed keys whose windows touch those blocks
(``exp2(q.k * scale * log2e - lse * log2e)``, summed over the G heads), pools them onto the blocks with the
overlap weights ``w(i, j)`` as a small float32-accurate dot, and merges the step's blocks into a running
top-k. No score tensor ever reaches memory.

Ranking uses one int64 key per block, ``(score bits << 32) | (2^32 - 1 - j)``: scores are >= 0, so their
float32 bit patterns order like the scores, and the low word puts the lower block first among equal scores.
Forced blocks get the bits of +inf, blocks that are not candidates the key -1. The running best (TOPKP keys)
stays sorted descending; a step sorts its TOPKP keys ascending, and the elementwise maximum of the two is
a bitonic sequence holding the TOPKP largest of both, which one bitonic merge sorts (bitonic top-k: 2.1x
fewer compare-exchanges than sorting all 2 * TOPKP keys, and the sort is most of the kernel's time).

Tiles come from a table (``ops/select_blocks.py``): first flattened token row, end row of its sequence,
position of the first token within the sequence, first compressed row of the sequence; unused tiles have
first row == end row.
"""

import triton
import triton.language as tl

from .common import finite_or_zero, fp32_scales


@triton.jit
def _merge_top(best, step):
    """The largest keys of best [BLOCK_T, TOPKP] (sorted descending) and step [BLOCK_T, TOPKP], sorted descending."""
    return tl.bitonic_merge(tl.maximum(best, tl.sort(step, dim=1)), dim=1, descending=True)


@triton.jit
def _split_tf32_dot(a, b):
    """a [M, K] float32 @ b [K, N] whose entries are exact in tf32, to float32 accuracy on tensor cores: a is
    split into three tf32 parts (hi + mid + lo == a), whose products with b are exact."""
    hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # keep the 10 high mantissa bits
    rest = a - hi
    mid = (rest.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    acc = tl.dot(rest - mid, b, input_precision="tf32")
    acc = tl.dot(mid, b, acc, input_precision="tf32")
    return tl.dot(hi, b, acc, input_precision="tf32")


@triton.jit
def _select_blocks_kernel(
    q, k_cmp, lse, tile_first_row, tile_end_row, tile_position, tile_cmp_row, indices, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, KERNEL_SIZE: tl.constexpr, KERNEL_STRIDE: tl.constexpr, BS: tl.constexpr,
    TOPK: tl.constexpr, TOPKP: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NBT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    first_row = tl.load(tile_first_row + tile).to(tl.int64)
    end_row = tl.load(tile_end_row + tile).to(tl.int64)
    first_position = tl.load(tile_position + tile)
    cmp_row = tl.load(tile_cmp_row + tile).to(tl.int64)
    _, qk_scale = fp32_scales(scale)
    M: tl.constexpr = BLOCK_T * GP

    # Rows of the QK dot: token r // GP of the tile, head r % GP of the group.
    offs_m = tl.arange(0, M)
    row_token = first_row + offs_m // GP
    row_head = offs_m % GP
    row_valid = (row_token < end_row) & (row_head < G)
    rows = row_token * HQ + h * G + row_head
    offs_d = tl.arange(0, BLOCK_D)
    qv = tl.load(q + rows[:, None] * D + offs_d[None, :], mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    lse2 = finite_or_zero(tl.load(lse + rows, mask=row_valid, other=0.0)) * 1.4426950408889634
    row_position = first_position + offs_m // GP
    # Compressed keys i < row_visible are visible: i * stride + kernel_size - 1 <= position.
    row_visible = tl.where(
        row_position >= KERNEL_SIZE - 1, (row_position - KERNEL_SIZE + 1) // KERNEL_STRIDE + 1, 0
    )
    row_visible = tl.where(row_valid, row_visible, 0)

    # Per token of the tile.
    offs_t = tl.arange(0, BLOCK_T)
    token_valid = first_row + offs_t < end_row
    last_block = tl.where(token_valid, (first_position + offs_t) // BS, -1)
    num_steps_blocks = tl.max(last_block, 0) + 1
    max_visible = tl.max(row_visible, 0)

    offs_c = tl.arange(0, BLOCK_C)
    offs_b = tl.arange(0, TOPKP)
    best = tl.full([BLOCK_T, TOPKP], -1, tl.int64)
    for first_block in range(0, num_steps_blocks, NBT):
        # Windows touching blocks [first_block, first_block + NBT): i * stride + kernel_size > first_block * BS.
        reach = first_block * BS - KERNEL_SIZE + 1
        first_window = tl.where(reach > 0, (reach + KERNEL_STRIDE - 1) // KERNEL_STRIDE, 0)
        window = first_window + offs_c
        kt = tl.load(
            k_cmp + ((cmp_row + window) * HKV + h)[None, :] * D + offs_d[:, None],
            mask=(window[None, :] < max_visible) & (offs_d[:, None] < D), other=0.0,
        )
        s = tl.dot(qv, kt, input_precision=INPUT_PRECISION) * qk_scale
        visible = window[None, :] < row_visible[:, None]
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        p = tl.sum(tl.reshape(p, (BLOCK_T, GP, BLOCK_C)), 1)  # [BLOCK_T, BLOCK_C]

        block = first_block + offs_b  # [TOPKP]
        window_start = window * KERNEL_STRIDE
        shared = tl.minimum(window_start[:, None] + KERNEL_SIZE, (block[None, :] + 1) * BS) - tl.maximum(
            window_start[:, None], block[None, :] * BS
        )
        weight = tl.where((shared > 0) & (offs_b[None, :] < NBT), shared.to(tl.float32), 0.0)
        # Pooling in float32 accuracy, which the selection must match. With 64+ tokens per tile the split tf32
        # dot on tensor cores is 1.25x faster for the whole kernel (H100); with fewer tokens (G > 1) the FMA
        # dot is faster.
        if BLOCK_T >= 64:
            score = _split_tf32_dot(p, weight)
        else:
            score = tl.dot(p, weight, input_precision="ieee")
        score = tl.maximum(score / KERNEL_STRIDE, 0.0)  # [BLOCK_T, TOPKP]

        candidate = (block[None, :] <= last_block[:, None]) & (offs_b[None, :] < NBT)
        forced = (block[None, :] < INIT_BLOCKS) | (block[None, :] > last_block[:, None] - LOCAL_BLOCKS)
        bits = tl.where(forced, 0x7F800000, score.to(tl.int32, bitcast=True)).to(tl.int64)
        key = (bits << 32) | (0xFFFFFFFF - block[None, :].to(tl.int64))
        best = _merge_top(best, tl.where(candidate, key, -1))

    # Keys -> block indices, ascending with the empty (-1) slots last.
    chosen = tl.where((best >= 0) & (offs_b[None, :] < TOPK), 0xFFFFFFFF - (best & 0xFFFFFFFF), 1 << 40)
    chosen = tl.sort(chosen, dim=1)
    out = tl.where(chosen == (1 << 40), -1, chosen).to(tl.int32)
    out_rows = (first_row + offs_t) * HKV + h
    tl.store(indices + out_rows[:, None] * TOPK + offs_b[None, :], out,
             mask=token_valid[:, None] & (offs_b[None, :] < TOPK))
