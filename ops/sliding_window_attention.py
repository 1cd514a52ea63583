"""``torch.ops.fsa.sliding_window_attention``: query at position t attends keys ``t - window_size < s <= t``.

q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq] (float32).
Differentiable in q, k, v. With ``cu_seqlens`` the window stays inside each sequence.

Kernels: Triton masked flash attention (``_kernels/masked_attention.py``) that visits only the key tiles of
the window (cost O(T * window)), on CUDA and on CPU tensors under ``TRITON_INTERPRET=1`` with the CPU kernel
disabled; vectorised PyTorch on CPU and for float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _torch_attention as torch_attention
from . import _validation as check
from ._masked_attention import masked_attention_backward, masked_attention_forward, window_spans
from ._library import (
    attention_grads_like, attention_outputs_like, register_attention_autograd, resolve_scale, triton_custom_op,
)


def _check_inputs(q, k, v, window_size, scale, cu_seqlens) -> None:
    check.check_qkv(q, k, v)
    check.check_positive("window_size", window_size)
    check.check_cu_seqlens(cu_seqlens, q, k.shape[1])
    check.check_keys_cover_queries(q, k)


def _plan(q, k, window_size, cu_seqlens):
    """Segments and the key selector of the CPU kernel."""
    bounds = None if cu_seqlens is None else check.check_cu_seqlens_values(cu_seqlens, q.shape[1])
    segments = torch_attention.sequence_segments(q.shape[0], q.shape[1], k.shape[1], bounds)
    # A chunk of C queries reads C + window - 1 keys: chunks about as long as the window waste little work.
    cap = max(64, min(window_size, 256))
    chunk = torch_attention.chunk_size(q.shape[2] * (min(window_size, k.shape[1]) + cap), cap=cap)

    def select_keys(segment, positions):
        lo, hi = max(0, positions.start - window_size + 1), positions.stop
        query_pos = torch.arange(positions.start, positions.stop, device=q.device)
        distance = query_pos[:, None] - torch.arange(lo, hi, device=q.device)[None, :]
        return slice(lo, hi), ((distance >= 0) & (distance < window_size))[:, None, None, :]

    return segments, select_keys, chunk


@triton_custom_op("sliding_window_attention")
def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, v, window_size, scale, cu_seqlens)
    if q.dtype == torch.float64:
        return _forward_torch(q, k, v, window_size, scale, cu_seqlens)
    spans = window_spans(q.shape[1], k.shape[1], window_size, cu_seqlens, q.device)
    return masked_attention_forward(q, k, v, *spans, resolve_scale(scale, q.shape[-1]))


def _forward_torch(q, k, v, window_size, scale, cu_seqlens):
    segments, select_keys, chunk = _plan(q, k, window_size, cu_seqlens)
    return torch_attention.attention_forward(q, k, v, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk)


@sliding_window_attention.register_kernel("cpu")
def _(q, k, v, window_size, scale=None, cu_seqlens=None):
    _check_inputs(q, k, v, window_size, scale, cu_seqlens)
    return _forward_torch(q, k, v, window_size, scale, cu_seqlens)


@sliding_window_attention.register_fake
def _(q, k, v, window_size, scale=None, cu_seqlens=None):
    _check_inputs(q, k, v, window_size, scale, cu_seqlens)
    return attention_outputs_like(q, v.shape[-1])


@triton_custom_op("sliding_window_attention_backward")
def sliding_window_attention_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    window_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if q.dtype == torch.float64:
        return _backward_torch(do, dlse, q, k, v, o, lse, window_size, scale, cu_seqlens)
    spans = window_spans(q.shape[1], k.shape[1], window_size, cu_seqlens, q.device)
    return masked_attention_backward(
        do, dlse, q, k, v, o, lse, *spans, resolve_scale(scale, q.shape[-1]), max_tokens_per_key=window_size
    )


def _backward_torch(do, dlse, q, k, v, o, lse, window_size, scale, cu_seqlens):
    segments, select_keys, chunk = _plan(q, k, window_size, cu_seqlens)
    return torch_attention.attention_backward(
        do, dlse, q, k, v, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@sliding_window_attention_backward.register_kernel("cpu")
def _(do, dlse, q, k, v, o, lse, window_size, scale=None, cu_seqlens=None):
    return _backward_torch(do, dlse, q, k, v, o, lse, window_size, scale, cu_seqlens)


@sliding_window_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, window_size, scale=None, cu_seqlens=None):
    return attention_grads_like(q, k, v)


register_attention_autograd(sliding_window_attention, sliding_window_attention_backward)
