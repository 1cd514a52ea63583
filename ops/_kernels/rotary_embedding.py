"""Rotate-half RoPE in one pass (``ops/rotary_embedding.py``): read x once, write the rotated rows once."""

import triton
import triton.language as tl


@triton.jit
def _rotary_embedding_kernel(
    x, positions, inv_freq, out, num_rows, num_tokens, num_heads, stride_b, stride_t, stride_h,
    POSITIONS_PER_BATCH: tl.constexpr, INVERSE: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rows r = (b * T + t) * H + h of x [B, T, H, 2 * HALF] (last dim contiguous) into contiguous out:
    ``out = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)`` with angles ``position * inv_freq`` in float32;
    INVERSE rotates by the negative angles (the backward: RoPE is a rotation)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_HALF)
    row_mask = row < num_rows
    mask = row_mask[:, None] & (offs[None, :] < HALF)
    h = row % num_heads
    token = row // num_heads  # b * T + t
    b = token // num_tokens
    t = token % num_tokens
    position = tl.load(positions + (token if POSITIONS_PER_BATCH else t), mask=row_mask, other=0).to(tl.float32)
    angle = position[:, None] * tl.load(inv_freq + offs, mask=offs < HALF, other=0.0)[None, :]
    cos, sin = tl.cos(angle), tl.sin(angle)
    if INVERSE:
        sin = -sin
    source = x + (b * stride_b + t * stride_t + h * stride_h)[:, None] + offs[None, :]
    x1 = tl.load(source, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(source + HALF, mask=mask, other=0.0).to(tl.float32)
    target = out + row[:, None] * (2 * HALF) + offs[None, :]
    tl.store(target, (x1 * cos - x2 * sin).to(out.dtype.element_ty), mask=mask)
    tl.store(target + HALF, (x2 * cos + x1 * sin).to(out.dtype.element_ty), mask=mask)
