"""``torch.ops.fsa.selected_attention``: exact attention over the selected key blocks.

Query at position t, head h attends the keys ``s <= t`` of the blocks ``indices[b, t, h // G, :]``
(block j = keys ``[j*block_size, (j+1)*block_size)`` of the query's sequence). Indices are int32
``[B, Tq, Hkv, topk]``, strictly ascending with ``-1`` (empty) slots last; an index outside
``[0, t // block_size]`` is treated as ``-1`` and never read.

q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq] (float32).
Differentiable in q, k, v. Kernels: vectorised PyTorch that gathers the selected blocks per query (CPU,
and CUDA until the Triton FSA / NSA kernels land).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _torch_attention as torch_attention
from . import _validation as check
from ._library import attention_grads_like, attention_outputs_like, op_name, register_attention_autograd, resolve_scale


def _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens) -> None:
    check.check_qkv(q, k, v)
    check.check_indices(indices, q, k.shape[2])
    check.check_positive("block_size", block_size)
    check.check_cu_seqlens(cu_seqlens, q, k.shape[1])
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"k must have at least as many tokens as q: Tq={q.shape[1]}, Tk={k.shape[1]}")


def _plan(q, k, v, indices, block_size, cu_seqlens):
    bounds = None if cu_seqlens is None else check.check_cu_seqlens_values(cu_seqlens, q.shape[1])
    segments = torch_attention.sequence_segments(q.shape[0], q.shape[1], k.shape[1], bounds)
    topk = indices.shape[-1]
    keys_per_query = topk * block_size
    chunk = torch_attention.chunk_size(keys_per_query * (q.shape[2] + k.shape[2] * (k.shape[3] + v.shape[3])))
    offsets = torch.arange(block_size, device=q.device)

    def select_keys(segment, positions):
        start = segment.query_start + positions.start - segment.first_position
        blocks = indices[segment.batch, start : start + len(positions)].long()  # [C, Hkv, topk]
        query_pos = torch.arange(positions.start, positions.stop, device=q.device).view(-1, 1, 1)
        valid = (blocks >= 0) & (blocks <= query_pos // block_size)
        if positions.stop <= keys_per_query:
            # Short prefix: a shared span with a block-membership mask is cheaper than a gather.
            key_pos = torch.arange(positions.stop, device=q.device)
            member = ((blocks.masked_fill(~valid, -1).unsqueeze(-1) == key_pos // block_size)).any(2)
            return slice(0, positions.stop), (member & (key_pos <= query_pos)).unsqueeze(2)
        rows = (blocks.unsqueeze(-1) * block_size + offsets).flatten(2)  # [C, Hkv, topk * block_size]
        mask = valid.repeat_interleave(block_size, dim=2) & (rows <= query_pos)
        return rows.masked_fill(~mask, 0), mask.unsqueeze(2)

    return segments, select_keys, chunk


@torch.library.custom_op(op_name("selected_attention"), mutates_args=())
def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, block_size: int,
    scale: float | None = None, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens)
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens)
    return torch_attention.attention_forward(
        q, k, v, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@selected_attention.register_fake
def _(q, k, v, indices, block_size, scale=None, cu_seqlens=None):
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens)
    return attention_outputs_like(q, v.shape[-1])


@torch.library.custom_op(op_name("selected_attention_backward"), mutates_args=())
def selected_attention_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    indices: Tensor, block_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens)
    return torch_attention.attention_backward(
        do, dlse, q, k, v, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@selected_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, indices, block_size, scale=None, cu_seqlens=None):
    return attention_grads_like(q, k, v)


register_attention_autograd(selected_attention, selected_attention_backward)
