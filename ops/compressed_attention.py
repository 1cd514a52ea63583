"""``torch.ops.fsa.compressed_attention``: attention over block-compressed keys and values.

The query at position t (within its sequence) sees compressed key i iff ``t >= i*kernel_stride +
kernel_size - 1``, i.e. the whole window of i is in its past; a query that sees none gets o = 0, lse = -inf.

q [B, Tq, Hq, D], k_cmp [B, Tc, Hkv, D], v_cmp [B, Tc, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq]
with ``Tc = max(0, (Tk - kernel_size) // kernel_stride + 1)``; ``Tk = seqlen_k`` (default Tq). With
``cu_seqlens`` the compressed sequences are packed one after another in that many rows (the bound of the
packed total for ``kernel_stride <= kernel_size``), as ``fsa_compile.compress`` returns them; the op derives
the offsets from ``cu_seqlens``. Differentiable in q, k_cmp, v_cmp.

Kernels: Triton masked flash attention (``_kernels/masked_attention.py``) on CUDA and on CPU tensors under
``TRITON_INTERPRET=1`` with the CPU kernel disabled; vectorised PyTorch on CPU and for float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _torch_attention as torch_attention
from . import _validation as check
from ._masked_attention import compressed_spans, masked_attention_backward, masked_attention_forward
from ._library import (
    attention_grads_like, attention_outputs_like, register_attention_autograd, resolve_scale, triton_custom_op,
)


def _check_inputs(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k) -> None:
    check.check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    check.check_compression(kernel_size, kernel_stride)
    check.check_cu_seqlens(cu_seqlens, q, q.shape[1])
    num_keys = check.check_seqlen_k(seqlen_k, q.shape[1], cu_seqlens)
    check.check_compressed_keys("k_cmp", k_cmp, q, num_keys, kernel_size, kernel_stride)


def compressed_segments(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k) -> list[torch_attention.Segment]:
    """Segments whose key rows index the compressed keys (CPU path: reads cu_seqlens)."""
    num_queries = q.shape[1]
    if cu_seqlens is None:
        num_keys = num_queries if seqlen_k is None else seqlen_k
        num_cmp = check.num_compressed(num_keys, kernel_size, kernel_stride)
        return [
            torch_attention.Segment(b, 0, num_queries, 0, num_cmp, num_keys - num_queries)
            for b in range(q.shape[0])
        ]
    bounds = check.check_cu_seqlens_values(cu_seqlens, num_queries)
    segments, row = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        num_cmp = check.num_compressed(end - start, kernel_size, kernel_stride)
        if end > start:
            segments.append(torch_attention.Segment(0, start, end, row, row + num_cmp, 0))
        row += num_cmp
    return segments


def visible_compressed(positions: range, num_cmp: int, kernel_size: int, kernel_stride: int, device):
    """Compressed keys a chunk of queries can see: (slice(0, hi), mask [C, hi])."""
    hi = min(num_cmp, max(0, (positions.stop - 1 - kernel_size + 1) // kernel_stride + 1))
    window_end = torch.arange(hi, device=device) * kernel_stride + kernel_size - 1
    query_pos = torch.arange(positions.start, positions.stop, device=device)
    return slice(0, hi), query_pos[:, None] >= window_end[None, :]


def _plan(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k):
    segments = compressed_segments(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k)
    longest = max((s.key_end - s.key_start for s in segments), default=1)
    chunk = torch_attention.chunk_size(q.shape[2] * max(1, longest))

    def select_keys(segment, positions):
        rows, mask = visible_compressed(
            positions, segment.key_end - segment.key_start, kernel_size, kernel_stride, q.device
        )
        return rows, mask[:, None, None, :]

    return segments, select_keys, chunk


@triton_custom_op("compressed_attention")
def compressed_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kernel_size: int, kernel_stride: int,
    scale: float | None = None, cu_seqlens: Tensor | None = None, seqlen_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k)
    if q.dtype == torch.float64:
        return _forward_torch(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k)
    spans = _spans(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k)
    return masked_attention_forward(q, k_cmp, v_cmp, *spans, resolve_scale(scale, q.shape[-1]))


def _spans(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k):
    seqlen_k = q.shape[1] if seqlen_k is None else seqlen_k
    return compressed_spans(q.shape[1], seqlen_k, kernel_size, kernel_stride, cu_seqlens, q.device)


def _forward_torch(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k):
    segments, select_keys, chunk = _plan(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k)
    return torch_attention.attention_forward(
        q, k_cmp, v_cmp, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@compressed_attention.register_kernel("cpu")
def _(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale=None, cu_seqlens=None, seqlen_k=None):
    _check_inputs(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k)
    return _forward_torch(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k)


@compressed_attention.register_fake
def _(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale=None, cu_seqlens=None, seqlen_k=None):
    _check_inputs(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k)
    return attention_outputs_like(q, v_cmp.shape[-1])


@triton_custom_op("compressed_attention_backward")
def compressed_attention_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, o: Tensor, lse: Tensor,
    kernel_size: int, kernel_stride: int, scale: float | None = None, cu_seqlens: Tensor | None = None,
    seqlen_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if q.dtype == torch.float64:
        return _backward_torch(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale, cu_seqlens,
                               seqlen_k)
    spans = _spans(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k)
    return masked_attention_backward(do, dlse, q, k_cmp, v_cmp, o, lse, *spans, resolve_scale(scale, q.shape[-1]))


def _backward_torch(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k):
    segments, select_keys, chunk = _plan(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k)
    return torch_attention.attention_backward(
        do, dlse, q, k_cmp, v_cmp, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@compressed_attention_backward.register_kernel("cpu")
def _(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale=None, cu_seqlens=None, seqlen_k=None):
    return _backward_torch(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k)


@compressed_attention_backward.register_fake
def _(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale=None, cu_seqlens=None, seqlen_k=None):
    return attention_grads_like(q, k_cmp, v_cmp)


register_attention_autograd(compressed_attention, compressed_attention_backward)
