"""``torch.ops.fsa.sliding_window_attention``: query at position t attends keys ``t - window_size < s <= t``.

q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq] (float32).
Differentiable in q, k, v. With ``cu_seqlens`` the window stays inside each sequence; with ``seqlens_k`` (a batch
of caches) row b's queries are the last Tq of its first ``seqlens_k[b]`` keys.

Kernels: Triton masked flash attention (``_kernels/masked_attention.py``) that visits only the key tiles of
the window (cost O(T * window)), on CUDA and on CPU tensors under ``TRITON_INTERPRET=1`` with the CPU kernel
disabled; vectorised PyTorch on CPU and for float64.
"""

from __future__ import annotations

import torch

from . import _torch_attention as torch_attention
from . import _validation as check
from ._layout import SequenceLayout
from ._library import define_attention_op, resolve_scale
from ._masked_attention import masked_attention_backward, masked_attention_forward

SCHEMA = ("(Tensor q, Tensor k, Tensor v, SymInt window_size, float? scale=None, Tensor? cu_seqlens=None, "
          "Tensor? cu_seqlens_k=None, Tensor? seqlens_k=None) -> (Tensor, Tensor)")



def _check_inputs(q, k, v, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k) -> None:
    check.check_qkv(q, k, v)
    check.check_positive("window_size", window_size)
    check.check_cu_seqlens(cu_seqlens, q, k.shape[1], cu_seqlens_k)
    check.check_seqlens_k(seqlens_k, q, cu_seqlens)
    check.check_keys_cover_queries(q, k)


# ---- CPU path ----------------------------------------------------------------------------------------------

def _plan(q, k, window_size, cu_seqlens, cu_seqlens_k, seqlens_k):
    """Segments and the key selector of the CPU kernel."""
    segments = SequenceLayout.of(q, k.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k).segments()
    # A chunk of C queries reads C + window - 1 keys: chunks about as long as the window waste little work.
    cap = max(64, min(window_size, 256))
    chunk = torch_attention.chunk_size(q.shape[2] * (min(window_size, k.shape[1]) + cap), cap=cap)

    def select_keys(segment, positions):
        lo, hi = max(0, positions.start - window_size + 1), positions.stop
        query_pos = torch.arange(positions.start, positions.stop, device=q.device)
        distance = query_pos[:, None] - torch.arange(lo, hi, device=q.device)[None, :]
        return slice(lo, hi), ((distance >= 0) & (distance < window_size))[:, None, None, :]

    return segments, select_keys, chunk


def _forward_torch(q, k, v, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k):
    segments, select_keys, chunk = _plan(q, k, window_size, cu_seqlens, cu_seqlens_k, seqlens_k)
    return torch_attention.attention_forward(q, k, v, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk)


def _backward_torch(do, dlse, q, k, v, o, lse, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k):
    segments, select_keys, chunk = _plan(q, k, window_size, cu_seqlens, cu_seqlens_k, seqlens_k)
    return torch_attention.attention_backward(
        do, dlse, q, k, v, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


# ---- CUDA path ---------------------------------------------------------------------------------------------

# Batched caches (seqlens_k) give per-row span tables [B, Tq]: the masked kernels take them as they are.

def _forward_triton(q, k, v, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k):
    spans = SequenceLayout.of(q, k.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k).window_spans(window_size)
    return masked_attention_forward(q, k, v, *spans, resolve_scale(scale, q.shape[-1]),
                                    max_span=min(window_size, k.shape[1]))


def _backward_triton(do, dlse, q, k, v, o, lse, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k):
    spans = SequenceLayout.of(q, k.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k).window_spans(window_size)
    return masked_attention_backward(
        do, dlse, q, k, v, o, lse, *spans, resolve_scale(scale, q.shape[-1]), max_tokens_per_key=window_size
    )


# ---- registration ------------------------------------------------------------------------------------------

sliding_window_attention, sliding_window_attention_backward = define_attention_op(
    "sliding_window_attention", SCHEMA, check=_check_inputs, torch_forward=_forward_torch, triton_forward=_forward_triton,
    torch_backward=_backward_torch, triton_backward=_backward_triton,
)
