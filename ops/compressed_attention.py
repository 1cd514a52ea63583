"""``torch.ops.fsa.compressed_attention``: attention over block-compressed keys and values.

The query at position t (within its sequence) sees compressed key i iff ``t >= i*kernel_stride +
kernel_size - 1``, i.e. the whole window of i is in its past; a query that sees none gets o = 0, lse = -inf.

q [B, Tq, Hq, D], k_cmp [B, Tc, Hkv, D], v_cmp [B, Tc, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq]
with ``Tc = max(0, (Tk - kernel_size) // kernel_stride + 1)``; ``Tk = seqlen_k`` (default Tq). With
``cu_seqlens`` the compressed sequences are packed one after another in that many rows (the bound of the
packed total for ``kernel_stride <= kernel_size``), as ``fsa_compile.compress`` returns them; the op derives
the offsets from ``cu_seqlens``. With ``seqlens_k`` (a batch of caches, ``seqlen_k`` = the buffers' length) row b
has ``seqlens_k[b]`` keys, its compressed keys are the first rows of ``k_cmp[b]``. Differentiable in q, k_cmp,
v_cmp.

Kernels: on CUDA, whole equal-length sequences in 16-bit run cuDNN's dense causal attention over regrouped
queries (``_compressed_dense``) from the lengths where it is faster; otherwise Triton masked flash attention
(``_kernels/masked_attention.py``), also on CPU tensors under ``TRITON_INTERPRET=1`` with the CPU kernel disabled;
vectorised PyTorch on CPU and for float64.
"""

from __future__ import annotations

import torch

from . import _compressed_dense as dense
from . import _torch_attention as torch_attention
from . import _validation as check
from ._layout import SequenceLayout, visible_compressed
from ._library import define_attention_op, resolve_scale
from ._masked_attention import masked_attention_backward, masked_attention_forward

SCHEMA = ("(Tensor q, Tensor k_cmp, Tensor v_cmp, SymInt kernel_size, SymInt kernel_stride, float? scale=None, "
          "Tensor? cu_seqlens=None, SymInt? seqlen_k=None, Tensor? cu_seqlens_k=None, Tensor? seqlens_k=None) "
          "-> (Tensor, Tensor)")



def _check_inputs(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k, cu_seqlens_k,
                  seqlens_k) -> None:
    check.check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    check.check_compression(kernel_size, kernel_stride)
    check.check_cu_seqlens(cu_seqlens, q, q.shape[1], cu_seqlens_k)
    check.check_seqlens_k(seqlens_k, q, cu_seqlens)
    num_keys = check.check_seqlen_k(seqlen_k, q.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k)
    check.check_compressed_keys("k_cmp", k_cmp, q, num_keys, kernel_size, kernel_stride)


# ---- CPU path ----------------------------------------------------------------------------------------------

def visible_compressed_keys(positions: range, num_cmp: int, kernel_size: int, kernel_stride: int, device):
    """Compressed keys a chunk of queries at ``positions`` can see: (slice(0, hi), mask [C, hi])."""
    hi = min(num_cmp, visible_compressed(positions.stop - 1, kernel_size, kernel_stride))
    visible = visible_compressed(torch.arange(positions.start, positions.stop, device=device), kernel_size,
                                 kernel_stride)
    return slice(0, hi), torch.arange(hi, device=device)[None, :] < visible[:, None]


def _plan(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k):
    layout = SequenceLayout.of(q, seqlen_k, cu_seqlens, cu_seqlens_k, seqlens_k)
    segments = layout.compressed_segments(kernel_size, kernel_stride)
    longest = max((s.key_end - s.key_start for s in segments), default=1)
    chunk = torch_attention.chunk_size(q.shape[2] * max(1, longest))

    def select_keys(segment, positions):
        rows, mask = visible_compressed_keys(
            positions, segment.key_end - segment.key_start, kernel_size, kernel_stride, q.device
        )
        return rows, mask[:, None, None, :]

    return segments, select_keys, chunk


def _forward_torch(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k, cu_seqlens_k,
                   seqlens_k):
    segments, select_keys, chunk = _plan(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k)
    return torch_attention.attention_forward(
        q, k_cmp, v_cmp, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


def _backward_torch(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k,
                    cu_seqlens_k, seqlens_k):
    segments, select_keys, chunk = _plan(q, kernel_size, kernel_stride, cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k)
    return torch_attention.attention_backward(
        do, dlse, q, k_cmp, v_cmp, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


# ---- CUDA path ---------------------------------------------------------------------------------------------

# Batched caches (seqlens_k) give per-row span tables [B, Tq]: the masked kernels take them as they are.

def _forward_triton(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k, cu_seqlens_k,
                    seqlens_k):
    if dense.applies(q, k_cmp, v_cmp, kernel_size, kernel_stride, cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k):
        return dense.forward_op(q, k_cmp, v_cmp, kernel_size, kernel_stride, resolve_scale(scale, q.shape[-1]))
    layout = SequenceLayout.of(q, seqlen_k, cu_seqlens, cu_seqlens_k, seqlens_k)
    spans = layout.compressed_spans(kernel_size, kernel_stride)
    return masked_attention_forward(q, k_cmp, v_cmp, *spans, resolve_scale(scale, q.shape[-1]),
                                    max_span=k_cmp.shape[1])


def _backward_triton(do, dlse, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k,
                     cu_seqlens_k, seqlens_k):
    # cuDNN's backward sums dq in a run-dependent order; the Triton kernel's is deterministic.
    if (dlse is None and not torch.are_deterministic_algorithms_enabled()
            and dense.applies(q, k_cmp, v_cmp, kernel_size, kernel_stride, cu_seqlens, seqlen_k, cu_seqlens_k,
                              seqlens_k)):
        return dense.backward_op(do, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride,
                                 resolve_scale(scale, q.shape[-1]))
    layout = SequenceLayout.of(q, seqlen_k, cu_seqlens, cu_seqlens_k, seqlens_k)
    spans = layout.compressed_spans(kernel_size, kernel_stride)
    return masked_attention_backward(do, dlse, q, k_cmp, v_cmp, o, lse, *spans, resolve_scale(scale, q.shape[-1]))


# ---- registration ------------------------------------------------------------------------------------------

compressed_attention, compressed_attention_backward = define_attention_op(
    "compressed_attention", SCHEMA, check=_check_inputs, torch_forward=_forward_torch, triton_forward=_forward_triton,
    torch_backward=_backward_torch, triton_backward=_backward_triton,
)
