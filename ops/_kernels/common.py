"""Shared ``@triton.jit`` helpers of the attention kernels."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def masked_scores(qv, kt, key_mask, qk_scale, INPUT_PRECISION: tl.constexpr):
    """qv [M, BLOCK_D] @ kt [BLOCK_D, BLOCK_S] * qk_scale (base-2 logits), -inf where ~key_mask [M, BLOCK_S]."""
    s = tl.dot(qv, kt, input_precision=INPUT_PRECISION) * qk_scale
    return tl.where(key_mask, s, float("-inf"))


@triton.jit
def finite_or_zero(x):
    """-inf (a row that sees no key) -> 0, so exp2(s - x) stays 0 instead of NaN."""
    return tl.where(x == float("-inf"), 0.0, x)


def next_power_of_2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))
