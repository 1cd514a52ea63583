"""Shared ``@triton.jit`` helpers of the attention kernels, and the backward's row-delta kernel (``@triton.jit``
code only: the host side is in ``ops/_launch.py``)."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def fp32_scales(scale):
    """-> (scale, scale * log2(e)) in float32: the kernels work in base 2, and Inductor may pass a Python float
    argument as float64, which would make loop-carried softmax state float64."""
    scale = tl.cast(scale, tl.float32)
    return scale, scale * 1.4426950408889634


@triton.jit
def masked_scores(qv, kt, key_mask, qk_scale, INPUT_PRECISION: tl.constexpr):
    """qv [M, BLOCK_D] @ kt [BLOCK_D, BLOCK_S] * qk_scale (base-2 logits), -inf where ~key_mask [M, BLOCK_S]."""
    s = tl.dot(qv, kt, input_precision=INPUT_PRECISION) * qk_scale
    return tl.where(key_mask, s, float("-inf"))


@triton.jit
def finite_or_zero(x):
    """-inf (a row that sees no key) -> 0, so exp2(s - x) stays 0 instead of NaN."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def repeats_earlier_slot(indices, row_start, slot, block, mask, TOPK: tl.constexpr):
    """Whether ``block``, at ``slot`` of the index row at offset ``row_start``, also sits at an earlier slot of that
    row (scalars or blocks of entries). A repeated block is attended once, at its first slot: TOPK loads of one row,
    which stay in L1."""
    repeat = block != block
    for j in tl.static_range(TOPK):
        earlier = tl.load(indices + row_start + j, mask=mask & (j < slot), other=-1)
        repeat = repeat | ((j < slot) & (earlier == block))
    return repeat


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, vv, INPUT_PRECISION: tl.constexpr):
    """Fold one key tile into an online softmax: base-2 logits s [M, N] (-inf where masked), values vv [N, DV],
    running max m_i [M], sum l_i [M] and output acc [M, DV]. -> the updated (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = finite_or_zero(m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """-> (acc / l_i, natural-log lse); a row that saw no key (l_i = 0) gets 0 and -inf, not NaN."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    row_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, row_lse


@triton.jit
def load_gradient_rows(do, lse, delta, rows, row_mask, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Backward inputs of the flat (token, head) rows: do [M, BLOCK_DV], lse in base 2 (-inf -> 0) and delta [M]."""
    offs_dv = tl.arange(0, BLOCK_DV)
    dov = tl.load(do + rows[:, None] * DV + offs_dv[None, :], mask=row_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse2 = finite_or_zero(tl.load(lse + rows, mask=row_mask, other=0.0)) * 1.4426950408889634
    row_delta = tl.load(delta + rows, mask=row_mask, other=0.0)
    return dov, lse2, row_delta


@triton.jit
def softmax_backward_delta_kernel(
    do, o, dlse, delta, num_rows, DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """delta [R] (float32) = rowsum(do * o) - dlse over rows of do, o [R, DV]; dlse [R] is read if HAS_DLSE."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (offs_dv[None, :] < DV)
    offsets = rows[:, None] * DV + offs_dv[None, :]
    dov = tl.load(do + offsets, mask=mask, other=0.0).to(tl.float32)
    ov = tl.load(o + offsets, mask=mask, other=0.0).to(tl.float32)
    row_delta = tl.sum(dov * ov, 1)
    if HAS_DLSE:
        row_delta -= tl.load(dlse + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(delta + rows, row_delta, mask=row_mask)
