"""``torch.ops.fsa.selected_attention``: exact attention over the selected key blocks.

Query at position t, head h attends the keys ``s <= t`` of the blocks ``indices[b, t, h // G, :]``
(block j = keys ``[j*block_size, (j+1)*block_size)`` of the query's sequence). Indices are int32
``[B, Tq, Hkv, topk]``, strictly ascending with ``-1`` (empty) slots last; an index outside
``[0, t // block_size]`` is treated as ``-1`` and never read.

q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq] (float32).
Differentiable in q, k, v.

Kernels:
- CUDA (and CPU tensors under ``TRITON_INTERPRET=1`` with the CPU kernel disabled): Triton.
  ``kernel="fsa"`` is the KV-block-centric FSA kernel (``_kernels/selected_fsa.py``), ``kernel="nsa"`` the
  query-centric vanilla NSA kernel (``_kernels/selected_nsa.py``); ``kernel="auto"`` picks by
  ``choose_kernel``. float32 inputs use IEEE-exact dots (no TF32). float64 falls back to PyTorch.
- CPU: vectorised PyTorch that gathers each query's selected blocks, chunked over queries.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import _torch_attention as torch_attention
from . import _validation as check
from ._kernels.common import next_power_of_2
from ._kernels.selected_fsa import (
    _selected_attention_fsa_bwd_kernel,
    _selected_attention_fsa_fwd_kernel_lse,
    _selected_attention_fsa_fwd_kernel_out,
)
from ._kernels.selected_nsa import _selected_attention_nsa_bwd_kernel, _selected_attention_nsa_fwd_kernel
from ._library import attention_grads_like, attention_outputs_like, op_name, register_attention_autograd, resolve_scale

KERNELS = ("auto", "fsa", "nsa")


def _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, kernel="auto") -> None:
    check.check_qkv(q, k, v)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
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


def choose_kernel(kernel: str, group_size: int, num_queries: int) -> str:
    """The ``kernel="auto"`` heuristic: FSA for small GQA groups and enough queries to fill its tiles.

    The vanilla NSA kernel pads every group to 16 rows per dot, so at G < 16 most of its tensor-core work is
    padding; FSA packs BLOCK_M = 64 query rows per dot at any G but pays for the index inversion, which does
    not amortise over a handful of queries (decode).
    """
    if kernel != "auto":
        return kernel
    return "fsa" if group_size < 16 and num_queries >= 64 else "nsa"


def _token_rows(q: Tensor, k: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """int32 [Tq] (row of each query token in k, row where its sequence starts), computed on the device."""
    num_queries, num_keys = q.shape[1], k.shape[1]
    tokens = torch.arange(num_queries, device=q.device, dtype=torch.int32)
    if cu_seqlens is None:
        return tokens + (num_keys - num_queries), torch.zeros_like(tokens)
    sequence = torch.searchsorted(cu_seqlens[1:], tokens, right=True).clamp(max=cu_seqlens.shape[0] - 2)
    return tokens, cu_seqlens[sequence]


def _invert_indices(indices, query_rows, sequence_starts, block_size, num_keys, num_sequences, block_q):
    """Per-KV-block lists of the (query, slot) entries that selected it, cut into tiles of <= block_q.

    Sync-free and sized from shapes: E = B*Tq*Hkv*topk entries. Returns int32 (sorted_entries [E],
    tile_keys, tile_starts, tile_lengths [num_tiles]) as described in ``_kernels/selected_fsa.py``.
    """
    batch, num_queries, hkv, topk = indices.shape
    device = indices.device
    blocks = indices.long()
    last_block = ((query_rows - sequence_starts) // block_size).long().view(1, -1, 1, 1)
    valid = (blocks >= 0) & (blocks <= last_block)
    batch_head = (torch.arange(batch, device=device).view(-1, 1, 1, 1) * hkv + torch.arange(hkv, device=device).view(1, 1, -1, 1))
    num_block_keys = batch * hkv * num_keys
    keys = batch_head * num_keys + sequence_starts.long().view(1, -1, 1, 1) + blocks * block_size
    keys = torch.where(valid, keys, num_block_keys).flatten()
    sorted_keys, sorted_entries = torch.sort(keys, stable=True)
    counts = torch.zeros(num_block_keys + 1, dtype=torch.long, device=device)
    counts.index_add_(0, keys, torch.ones_like(keys))
    counts = counts[:-1]
    entry_ends = counts.cumsum(0)
    tiles_per_key = (counts + block_q - 1) // block_q
    tile_ends = tiles_per_key.cumsum(0)
    # At most E / block_q full tiles plus one partial tile per non-empty block.
    max_blocks = batch * hkv * (num_keys // block_size + num_sequences + 1)
    num_tiles = max(1, (keys.numel() + block_q - 1) // block_q + max_blocks)
    tile = torch.arange(num_tiles, device=device)
    key = torch.searchsorted(tile_ends, tile, right=True)
    used = key < num_block_keys
    key = key.clamp(max=num_block_keys - 1)
    within = tile - (tile_ends[key] - tiles_per_key[key])
    tile_starts = entry_ends[key] - counts[key] + within * block_q
    tile_lengths = torch.where(used, (counts[key] - within * block_q).clamp(0, block_q), 0)
    tile_keys = torch.where(used, key, 0)
    return (sorted_entries.to(torch.int32), tile_keys.to(torch.int32), tile_starts.to(torch.int32),
            tile_lengths.to(torch.int32))


def _launch_config(q, k, v, indices, block_size):
    hq, hkv = q.shape[2], k.shape[2]
    return dict(
        HQ=hq, HKV=hkv, G=hq // hkv, TOPK=indices.shape[-1], BS=block_size, D=q.shape[-1], DV=v.shape[-1],
        BLOCK_S=next_power_of_2(block_size), BLOCK_D=next_power_of_2(q.shape[-1]),
        BLOCK_DV=next_power_of_2(v.shape[-1]),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


FSA_BLOCK_M = 64


def _fsa_tiles(q, k, indices, block_size, cu_seqlens, query_rows, sequence_starts, group):
    gp = triton.next_power_of_2(group)
    block_m = max(FSA_BLOCK_M, gp)
    num_sequences = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    tiles = _invert_indices(indices, query_rows, sequence_starts, block_size, k.shape[1], num_sequences, block_m // gp)
    return tiles, dict(GP=gp, BLOCK_M=block_m)


def _selected_attention_fwd(q, k, v, indices, block_size, scale, cu_seqlens, kernel):
    q, k, v, indices = (x.contiguous() for x in (q, k, v, indices))
    batch, num_queries, hq, d = q.shape
    hkv = k.shape[2]
    scale = resolve_scale(scale, d)
    config = _launch_config(q, k, v, indices, block_size)
    query_rows, sequence_starts = _token_rows(q, k, cu_seqlens)
    if choose_kernel(kernel, hq // hkv, num_queries) == "nsa":
        o, lse = attention_outputs_like(q, v.shape[-1])
        _selected_attention_nsa_fwd_kernel[(num_queries, batch * hkv)](
            q=q, k=k, v=v, indices=indices, query_rows=query_rows, sequence_starts=sequence_starts, o=o, lse=lse,
            scale=scale, Tq=num_queries, Tk=k.shape[1], BLOCK_G=next_power_of_2(hq // hkv), **config,
        )
        return o, lse
    (sorted_entries, tile_keys, tile_starts, tile_lengths), tile_config = _fsa_tiles(
        q, k, indices, block_size, cu_seqlens, query_rows, sequence_starts, hq // hkv
    )
    grid = (tile_keys.shape[0],)
    tile_args = dict(tile_keys=tile_keys, tile_starts=tile_starts, tile_lengths=tile_lengths,
                     sorted_entries=sorted_entries, query_rows=query_rows)
    entry_lse = torch.full((indices.numel(), hq // hkv), float("-inf"), dtype=torch.float32, device=q.device)
    lse_config = {name: value for name, value in config.items() if name not in ("DV", "BLOCK_DV")}
    _selected_attention_fsa_fwd_kernel_lse[grid](
        q=q, k=k, **tile_args, entry_lse=entry_lse, scale=scale, Tq=num_queries, Tk=k.shape[1],
        **lse_config, **tile_config,
    )
    lse = torch.logsumexp(entry_lse.view(batch, num_queries, hkv, -1, hq // hkv), dim=3).reshape(batch, num_queries, hq)
    o_acc = torch.zeros(batch, num_queries, hq, v.shape[-1], dtype=torch.float32, device=q.device)
    _selected_attention_fsa_fwd_kernel_out[grid](
        q=q, k=k, v=v, **tile_args, lse=lse, o_acc=o_acc, scale=scale, Tq=num_queries, Tk=k.shape[1],
        **config, **tile_config,
    )
    return o_acc.to(q.dtype), lse


def _selected_attention_bwd(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens, kernel):
    q, k, v, indices, do = (x.contiguous() for x in (q, k, v, indices, do))
    batch, num_queries, hq, d = q.shape
    hkv = k.shape[2]
    scale = resolve_scale(scale, d)
    config = _launch_config(q, k, v, indices, block_size)
    query_rows, sequence_starts = _token_rows(q, k, cu_seqlens)
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if choose_kernel(kernel, hq // hkv, num_queries) == "nsa":
        dq = torch.empty_like(q)
        _selected_attention_nsa_bwd_kernel[(num_queries, batch * hkv)](
            q=q, k=k, v=v, do=do, lse=lse.contiguous(), delta=delta, indices=indices, query_rows=query_rows,
            sequence_starts=sequence_starts, dq=dq, dk=dk, dv=dv, scale=scale, Tq=num_queries, Tk=k.shape[1],
            BLOCK_G=next_power_of_2(hq // hkv), **config,
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    (sorted_entries, tile_keys, tile_starts, tile_lengths), tile_config = _fsa_tiles(
        q, k, indices, block_size, cu_seqlens, query_rows, sequence_starts, hq // hkv
    )
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    _selected_attention_fsa_bwd_kernel[(tile_keys.shape[0],)](
        q=q, k=k, v=v, do=do, lse=lse.contiguous(), delta=delta, tile_keys=tile_keys, tile_starts=tile_starts,
        tile_lengths=tile_lengths, sorted_entries=sorted_entries, query_rows=query_rows, dq=dq, dk=dk, dv=dv,
        scale=scale, Tq=num_queries, Tk=k.shape[1], **config, **tile_config,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op(op_name("selected_attention"), mutates_args=())
def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, block_size: int,
    scale: float | None = None, cu_seqlens: Tensor | None = None, kernel: str = "auto",
) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, kernel)
    if q.dtype == torch.float64:
        return _selected_attention_torch(q, k, v, indices, block_size, scale, cu_seqlens)
    return _selected_attention_fwd(q, k, v, indices, block_size, scale, cu_seqlens, kernel)


def _selected_attention_torch(q, k, v, indices, block_size, scale, cu_seqlens):
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens)
    return torch_attention.attention_forward(q, k, v, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk)


@selected_attention.register_kernel("cpu")
def _(q, k, v, indices, block_size, scale=None, cu_seqlens=None, kernel="auto"):
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, kernel)
    return _selected_attention_torch(q, k, v, indices, block_size, scale, cu_seqlens)


@selected_attention.register_fake
def _(q, k, v, indices, block_size, scale=None, cu_seqlens=None, kernel="auto"):
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, kernel)
    return attention_outputs_like(q, v.shape[-1])


@torch.library.custom_op(op_name("selected_attention_backward"), mutates_args=())
def selected_attention_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    indices: Tensor, block_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    if q.dtype == torch.float64:
        return _selected_attention_backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens)
    return _selected_attention_bwd(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens, kernel)


def _selected_attention_backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens):
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens)
    return torch_attention.attention_backward(
        do, dlse, q, k, v, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@selected_attention_backward.register_kernel("cpu")
def _(do, dlse, q, k, v, o, lse, indices, block_size, scale=None, cu_seqlens=None, kernel="auto"):
    return _selected_attention_backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens)


@selected_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, indices, block_size, scale=None, cu_seqlens=None, kernel="auto"):
    return attention_grads_like(q, k, v)


register_attention_autograd(selected_attention, selected_attention_backward)
