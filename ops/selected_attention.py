"""``torch.ops.fsa.selected_attention``: exact attention over the selected key blocks.

Query at position t, head h attends the keys ``s <= t`` of the blocks ``indices[b, t, h // G, :]``
(block j = keys ``[j*block_size, (j+1)*block_size)`` of the query's sequence). Indices are int32
``[B, Tq, Hkv, topk]``, strictly ascending with ``-1`` (empty) slots last; an index outside
``[0, t // block_size]`` is treated as ``-1`` and never read, and a block repeated within a row is attended once
(the indices mean a set of blocks; every path drops the later slots of a repeat).

q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq] (float32).
Differentiable in q, k, v. With ``seqlens_k`` (a batch of caches) row b's queries are the last Tq of its first
``seqlens_k[b]`` keys.

Kernels:
- CUDA (and CPU tensors under ``TRITON_INTERPRET=1`` with the CPU kernel disabled): Triton.
  ``impl="fsa"`` is the KV-block-centric FSA kernel, ``impl="nsa"`` the query-centric vanilla NSA kernel;
  ``impl="auto"`` picks by the table in ``_selected_launchers.py``. float32 inputs use IEEE-exact dots (no TF32).
  float64 falls back to PyTorch.
- CPU: vectorised PyTorch that gathers each query's selected blocks, chunked over queries.

The Triton backwards add dk/dv with atomics (dq is deterministic): run-to-run float differences. Under
``torch.use_deterministic_algorithms(True)`` the FSA backward runs instead (for any ``impl``) with dk/dv summed
from per-work-item partials in a fixed order: identical from run to run. The forward and the other ops are
deterministic either way.
"""

from __future__ import annotations

import torch

from . import _selected_launchers as launchers
from . import _torch_attention as torch_attention
from . import _validation as check
from ._layout import SequenceLayout
from ._library import define_attention_op, resolve_scale

# Named ``impl`` rather than ``kernel``: Inductor's FallbackKernel.create() takes a ``kernel`` argument of its
# own and fails to lower an op with an argument of that name.
IMPLS = launchers.IMPLS
SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor indices, SymInt block_size, float? scale=None, "
          "Tensor? cu_seqlens=None, str impl=\"auto\", Tensor? cu_seqlens_k=None, Tensor? seqlens_k=None) "
          "-> (Tensor, Tensor)")



def _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k, seqlens_k) -> None:
    check.check_qkv(q, k, v)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check.check_indices(indices, q, k)
    check.check_positive("block_size", block_size)
    check.check_cu_seqlens(cu_seqlens, q, k.shape[1], cu_seqlens_k)
    check.check_seqlens_k(seqlens_k, q, cu_seqlens)
    check.check_keys_cover_queries(q, k)


# ---- CPU path ----------------------------------------------------------------------------------------------

def _repeats_earlier_slot(blocks: torch.Tensor) -> torch.Tensor:
    """bool [..., topk]: the slot's block also sits at an earlier slot of its row (attended once, at the first)."""
    slots = torch.arange(blocks.shape[-1], device=blocks.device)
    same = blocks.unsqueeze(-1) == blocks.unsqueeze(-2)  # [..., slot, earlier slot]
    return (same & (slots.view(-1, 1) > slots.view(1, -1))).any(-1)


def _plan(q, k, v, indices, block_size, cu_seqlens, cu_seqlens_k, seqlens_k):
    segments = SequenceLayout.of(q, k.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k).segments()
    keys_per_query = indices.shape[-1] * block_size
    chunk = torch_attention.chunk_size(keys_per_query * (q.shape[2] + k.shape[2] * (k.shape[3] + v.shape[3])))
    offsets = torch.arange(block_size, device=q.device)

    def select_keys(segment, positions):
        start = segment.query_start + positions.start - segment.first_position
        blocks = indices[segment.batch, start : start + len(positions)].long()  # [C, Hkv, topk]
        query_pos = torch.arange(positions.start, positions.stop, device=q.device).view(-1, 1, 1)
        valid = (blocks >= 0) & (blocks <= query_pos // block_size) & ~_repeats_earlier_slot(blocks)
        if positions.stop <= keys_per_query:
            # Short prefix: a shared span with a block-membership mask is cheaper than a gather.
            key_pos = torch.arange(positions.stop, device=q.device)
            member = ((blocks.masked_fill(~valid, -1).unsqueeze(-1) == key_pos // block_size)).any(2)
            return slice(0, positions.stop), (member & (key_pos <= query_pos)).unsqueeze(2)
        rows = (blocks.unsqueeze(-1) * block_size + offsets).flatten(2)  # [C, Hkv, topk * block_size]
        mask = valid.repeat_interleave(block_size, dim=2) & (rows <= query_pos)
        return rows.masked_fill(~mask, 0), mask.unsqueeze(2)

    return segments, select_keys, chunk


def _forward_torch(q, k, v, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k, seqlens_k):
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens, cu_seqlens_k, seqlens_k)
    return torch_attention.attention_forward(q, k, v, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk)


def _backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k,
                    seqlens_k):
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens, cu_seqlens_k, seqlens_k)
    return torch_attention.attention_backward(
        do, dlse, q, k, v, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


# ---- CUDA path (_selected_launchers.forward / backward) and registration -----------------------------------

selected_attention, selected_attention_backward = define_attention_op(
    "selected_attention", SCHEMA, check=_check_inputs, torch_forward=_forward_torch, triton_forward=launchers.forward,
    torch_backward=_backward_torch, triton_backward=launchers.backward,
)
