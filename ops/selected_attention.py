"""``torch.ops.fsa.selected_attention``: exact attention over the selected key blocks.

Query at position t, head h attends the keys ``s <= t`` of the blocks ``indices[b, t, h // G, :]``
(block j = keys ``[j*block_size, (j+1)*block_size)`` of the query's sequence). Indices are int32
``[B, Tq, Hkv, topk]``, strictly ascending with ``-1`` (empty) slots last; an index outside
``[0, t // block_size]`` is treated as ``-1`` and never read, and a block repeated within a row is attended once
(the indices mean a set of blocks; every path drops the later slots of a repeat).

q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq] (float32).
Differentiable in q, k, v.

Kernels:
- CUDA (and CPU tensors under ``TRITON_INTERPRET=1`` with the CPU kernel disabled): Triton.
  ``impl="fsa"`` is the KV-block-centric FSA kernel (``_kernels/selected_fsa.py``), ``impl="nsa"`` the
  query-centric vanilla NSA kernel (``_kernels/selected_nsa.py``); ``impl="auto"`` picks by
  ``choose_kernel``. float32 inputs use IEEE-exact dots (no TF32). float64 falls back to PyTorch.
- CPU: vectorised PyTorch that gathers each query's selected blocks, chunked over queries.

The Triton backwards add dk/dv with atomics (dq is deterministic): run-to-run float differences. Under
``torch.use_deterministic_algorithms(True)`` the FSA backward runs instead (for any ``impl``) with dk/dv summed
from per-work-item partials in a fixed order: identical from run to run. The forward and the other ops are
deterministic either way.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import _torch_attention as torch_attention
from . import _validation as check
from ._kernels.common import next_power_of_2
from ._kernels.selected_fsa import (
    _selected_attention_fsa_bwd_kernel,
    _selected_attention_fsa_dkdv_sum_kernel,
    _selected_attention_fsa_dq_sum_kernel,
    _selected_attention_fsa_fwd_kernel,
    _selected_attention_fsa_merge_kernel,
    _selection_keys_kernel,
)
from ._kernels.selected_nsa import _selected_attention_nsa_bwd_kernel, _selected_attention_nsa_fwd_kernel
from ._launch import fitted_kernel, fitting_key, launch_fitting
from ._library import (
    attention_grads_like, attention_outputs_like, register_attention_autograd, resolve_scale,
    softmax_backward_delta, triton_custom_op,
)
from ._sequences import token_sequences

# Named ``impl`` rather than ``kernel``: Inductor's FallbackKernel.create() takes a ``kernel`` argument of its
# own and fails to lower an op with an argument of that name.
IMPLS = ("auto", "fsa", "nsa")


def _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, impl="auto") -> None:
    check.check_qkv(q, k, v)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check.check_indices(indices, q, k)
    check.check_positive("block_size", block_size)
    check.check_cu_seqlens(cu_seqlens, q, k.shape[1])
    check.check_keys_cover_queries(q, k)


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


def _repeats_earlier_slot(blocks: Tensor) -> Tensor:
    """bool [..., topk]: the slot's block also sits at an earlier slot of its row (attended once, at the first)."""
    slots = torch.arange(blocks.shape[-1], device=blocks.device)
    same = blocks.unsqueeze(-1) == blocks.unsqueeze(-2)  # [..., slot, earlier slot]
    return (same & (slots.view(-1, 1) > slots.view(1, -1))).any(-1)


def choose_kernel(impl: str, group_size: int, num_queries: int, backward: bool = False) -> str:
    """The ``impl="auto"`` heuristic (measured on an H100, see ``benchmarks/bench_selected.py``).

    Backward: always FSA; the vanilla NSA backward adds dk/dv with atomics per (query, block) and was
    2x-30x slower at every G. Forward: the NSA kernel pads each group to 16 rows per dot, so at small G most of
    its tensor-core work is padding and FSA wins; at G >= 16 the padding is gone and NSA, which needs no
    index inversion or partial outputs, is faster (G = 16: 17.5 vs 22.5 ms at T = 64K; G = 4: FSA 6.2 vs 17 ms).
    Decode-sized calls (few queries) go to NSA.
    """
    if impl != "auto":
        return impl
    if backward:
        return "fsa"
    return "fsa" if group_size < 16 and num_queries >= 64 else "nsa"


def _token_rows(q: Tensor, k: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """int32 [Tq] (row of each query token in k, row where its sequence starts), computed on the device."""
    position, _, start = token_sequences(q.shape[1], k.shape[1], cu_seqlens, q.device)
    return (start + position).to(torch.int32), start.to(torch.int32)


def _invert_indices(indices, first_token, num_queries, query_rows, sequence_starts, block_size, num_keys, batch,
                    num_sequences, block_q):
    """Per-KV-block lists of the (query, slot) entries that selected it, cut into work items of <= block_q.

    ``indices [N, Hkv, topk]`` are the selections of the flattened tokens ``first_token .. first_token + N`` of
    ``[B * Tq]``. Sync-free and sized from shapes (E = N*Hkv*topk entries). Returns int32 (sorted_entries [E],
    item_keys, item_starts, item_lengths [num_items]) as described in ``_kernels/selected_fsa.py``, entries
    numbered from the chunk's first token, and the unsorted keys [E] (``B * Hkv * Tk`` for an entry never read).
    """
    num_tokens, hkv, topk = indices.shape
    device = indices.device
    num_block_keys = batch * hkv * num_keys
    # int32 keys when they fit: half the radix-sort passes of int64.
    keys = torch.empty(indices.numel(), dtype=torch.int32 if num_block_keys < 2**31 - 1 else torch.int64,
                       device=device)
    if keys.numel() > 0:
        wrap_triton(_selection_keys_kernel)[(triton.cdiv(keys.numel(), 1024),)](
            indices, query_rows, sequence_starts, keys, first_token, keys.numel(), num_block_keys, num_queries,
            num_keys, HKV=hkv, TOPK=topk, BS=block_size, BLOCK=1024,
        )
    sorted_keys, sorted_entries = torch.sort(keys, stable=True)
    # Entries of block key j: sorted positions [entry_bounds[j], entry_bounds[j + 1]). Not a histogram by
    # index_add_: torch.compile lowers that to a sort-based index_put_ that costs ~8 ms at T=64K.
    block_keys = torch.arange(num_block_keys + 1, device=device, dtype=keys.dtype)
    entry_bounds = torch.searchsorted(sorted_keys, block_keys)
    entry_ends = entry_bounds[1:]
    counts = entry_ends - entry_bounds[:-1]
    items_per_key = (counts + block_q - 1) // block_q
    item_ends = items_per_key.cumsum(0)
    # At most E / block_q full items plus one partial item per non-empty block.
    max_blocks = batch * hkv * (num_keys // block_size + num_sequences + 1)
    num_items = max(1, (keys.numel() + block_q - 1) // block_q + max_blocks)
    item = torch.arange(num_items, device=device)
    key = torch.searchsorted(item_ends, item, right=True)
    used = key < num_block_keys
    key = key.clamp(max=num_block_keys - 1)
    within = item - (item_ends[key] - items_per_key[key])
    item_starts = entry_ends[key] - counts[key] + within * block_q
    item_lengths = torch.where(used, (counts[key] - within * block_q).clamp(0, block_q), 0)
    item_keys = torch.where(used, key, 0)
    items = (sorted_entries.to(torch.int32), item_keys.to(torch.int32), item_starts.to(torch.int32),
             item_lengths.to(torch.int32))
    return items, keys


def _launch_config(q, k, v, indices, block_size):
    hq, hkv = q.shape[2], k.shape[2]
    return dict(
        HQ=hq, HKV=hkv, G=hq // hkv, TOPK=indices.shape[-1], BS=block_size, D=q.shape[-1], DV=v.shape[-1],
        BLOCK_S=next_power_of_2(block_size), BLOCK_D=next_power_of_2(q.shape[-1]),
        BLOCK_DV=next_power_of_2(v.shape[-1]),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


# Launch settings, tuned on an H100 (torch 2.11, triton 3.6) with benchmarks/tune_selected.py at T=64K, G in
# {1, 4}: block_m = query rows per dot; steps = dots per work item (a KV block is loaded once per
# block_m * steps rows). The backward keeps dk/dv accumulators in registers, so it wants more warps.
FSA_FWD = dict(block_m=64, steps=16, num_warps=4, num_stages=1)
FSA_BWD = dict(block_m=128, steps=16, num_warps=8, num_stages=2)
NSA_LAUNCH = dict(num_warps=4, num_stages=2)
# The FSA forward keeps one partial output per (token, selected block), topk times the output, and the backward
# one partial dq; both run over chunks of tokens whose partials fit in this many bytes.
FSA_PARTIAL_BYTES = 2 << 30
# Smaller settings tried in order when the tuned ones need more shared memory than the GPU has (float32
# inputs, head dims above 128).
FSA_FALLBACKS = (dict(block_m=64, steps=16, num_warps=4, num_stages=1), dict(block_m=16, steps=32, num_warps=4, num_stages=1))
NSA_FALLBACKS = (dict(num_warps=4, num_stages=1),)


def _fsa_work(k, indices, first_token, num_queries, cu_seqlens, query_rows, sequence_starts, block_size, group,
              settings):
    """Inverted indices (of the flattened tokens from ``first_token``), the meta-parameters of one launch and the
    entries' selection keys (``_invert_indices``)."""
    gp = triton.next_power_of_2(group)
    block_m = max(settings["block_m"], gp)
    num_sequences = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    items, keys = _invert_indices(
        indices, first_token, num_queries, query_rows, sequence_starts, block_size, k.shape[1], k.shape[0],
        num_sequences, block_m // gp * settings["steps"],
    )
    names = ("sorted_entries", "item_keys", "item_starts", "item_lengths")
    launch = dict(GP=gp, BLOCK_M=block_m, num_warps=settings["num_warps"], num_stages=settings["num_stages"])
    return dict(zip(names, items)), launch, keys


def _selected_attention_fwd(q, k, v, indices, block_size, scale, cu_seqlens, impl):
    q, k, v, indices = (x.contiguous() for x in (q, k, v, indices))
    batch, num_queries, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = resolve_scale(scale, d)
    config = _launch_config(q, k, v, indices, block_size)
    query_rows, sequence_starts = _token_rows(q, k, cu_seqlens)
    o, lse = attention_outputs_like(q, v.shape[-1])
    if choose_kernel(impl, group, num_queries) == "nsa":
        launch_fitting(
            lambda settings: fitted_kernel(_selected_attention_nsa_fwd_kernel, (num_queries, batch * hkv))(
                q=q, k=k, v=v, indices=indices, query_rows=query_rows, sequence_starts=sequence_starts, o=o,
                lse=lse, scale=scale, Tq=num_queries, Tk=k.shape[1], BLOCK_G=next_power_of_2(group), **config,
                **settings,
            ),
            (NSA_LAUNCH, *NSA_FALLBACKS),
            fitting_key("nsa_fwd", q, config),
        )
        return o, lse
    # One partial output per (token, selected block): process tokens in chunks so that they stay in budget.
    flat_indices = indices.view(batch * num_queries, hkv, indices.shape[-1])
    for first_token, chunk_indices in _token_chunks(flat_indices, group * (v.shape[-1] * q.element_size() + 4)):
        _selected_attention_fsa_fwd_chunk(
            q, k, v, chunk_indices, first_token, o, lse, scale, config, cu_seqlens, query_rows, sequence_starts,
            block_size,
        )
    return o, lse


def _token_chunks(flat_indices, bytes_per_entry):
    """(first_token, indices [N, Hkv, topk]) chunks of the flattened tokens whose per-entry partial buffers
    (``bytes_per_entry`` each) fit in FSA_PARTIAL_BYTES."""
    num_tokens, hkv, topk = flat_indices.shape
    chunk = max(1, FSA_PARTIAL_BYTES // max(1, hkv * topk * bytes_per_entry))
    for first_token in range(0, num_tokens, chunk):
        yield first_token, flat_indices[first_token : first_token + chunk]


def _selected_attention_fsa_fwd_chunk(
    q, k, v, indices, first_token, o, lse, scale, config, cu_seqlens, query_rows, sequence_starts, block_size
):
    """FSA forward of the flattened tokens ``first_token .. first_token + len(indices)``, written into o, lse."""
    num_queries, hkv = q.shape[1], k.shape[2]
    group = q.shape[2] // hkv
    num_tokens, _, topk = indices.shape
    o_partial = q.new_empty(indices.numel(), group, v.shape[-1])
    lse_partial = torch.full((indices.numel(), group), float("-inf"), dtype=torch.float32, device=q.device)

    def launch(settings):
        work, work_config, _ = _fsa_work(
            k, indices, first_token, num_queries, cu_seqlens, query_rows, sequence_starts, block_size, group, settings
        )
        fitted_kernel(_selected_attention_fsa_fwd_kernel, (work["item_keys"].shape[0],))(
            q=q, k=k, v=v, **work, query_rows=query_rows, o_partial=o_partial, lse_partial=lse_partial,
            scale=scale, first_token=first_token, Tq=num_queries, Tk=k.shape[1], **config, **work_config,
        )
        return work_config

    work_config = launch_fitting(launch, (FSA_FWD, *FSA_FALLBACKS), fitting_key("fsa_fwd", q, config))
    block_r = max(16, work_config["GP"])
    wrap_triton(_selected_attention_fsa_merge_kernel)[(triton.cdiv(num_tokens, block_r // work_config["GP"]), hkv)](
        o_partial=o_partial, lse_partial=lse_partial, o=o, lse=lse, first_token=first_token, num_tokens=num_tokens,
        HKV=hkv, G=group, GP=work_config["GP"], TOPK=topk, DV=v.shape[-1], BLOCK_R=block_r,
        BLOCK_DV=config["BLOCK_DV"],
    )


def _selected_attention_bwd(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens, impl):
    # Under torch.use_deterministic_algorithms(True) the FSA backward sums dk/dv partials in a fixed order instead
    # of adding them with atomics, whatever impl asks (the NSA backward has no such mode).
    deterministic = torch.are_deterministic_algorithms_enabled()
    q, k, v, indices, do, lse = (x.contiguous() for x in (q, k, v, indices, do, lse))
    batch, num_queries, hq, d = q.shape
    hkv = k.shape[2]
    scale = resolve_scale(scale, d)
    config = _launch_config(q, k, v, indices, block_size)
    query_rows, sequence_starts = _token_rows(q, k, cu_seqlens)
    delta = softmax_backward_delta(do, o, dlse)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if choose_kernel(impl, hq // hkv, num_queries, backward=True) == "nsa" and not deterministic:
        launch_fitting(
            lambda settings: fitted_kernel(_selected_attention_nsa_bwd_kernel, (num_queries, batch * hkv))(
                q=q, k=k, v=v, do=do, lse=lse, delta=delta, indices=indices, query_rows=query_rows,
                sequence_starts=sequence_starts, dq=dq, dk=dk, dv=dv, scale=scale, Tq=num_queries, Tk=k.shape[1],
                BLOCK_G=next_power_of_2(hq // hkv), **config, **settings,
            ),
            (NSA_LAUNCH, *NSA_FALLBACKS),
            fitting_key("nsa_bwd", q, config),
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    flat_indices = indices.view(batch * num_queries, hkv, indices.shape[-1])
    for first_token, chunk_indices in _token_chunks(flat_indices, hq // hkv * d * q.element_size()):
        _selected_attention_fsa_bwd_chunk(
            do, q, k, v, lse, delta, chunk_indices, first_token, dq, dk, dv, scale, config, cu_seqlens,
            query_rows, sequence_starts, block_size, deterministic,
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _selected_attention_fsa_bwd_chunk(
    do, q, k, v, lse, delta, indices, first_token, dq, dk, dv, scale, config, cu_seqlens, query_rows,
    sequence_starts, block_size, deterministic,
):
    """FSA backward of the flattened tokens ``first_token .. first_token + len(indices)``: writes their dq rows,
    adds to dk, dv (float32): with atomics, or deterministically through per-work-item partials (float32
    [items, BLOCK_S, BLOCK_D + BLOCK_DV], items <= entries / rows per item + KV blocks) summed in a fixed order."""
    num_queries, hkv = q.shape[1], k.shape[2]
    group = q.shape[2] // hkv
    num_tokens, _, topk = indices.shape
    dq_partial = q.new_empty(indices.numel(), group, q.shape[-1])

    def launch(settings):
        work, work_config, keys = _fsa_work(
            k, indices, first_token, num_queries, cu_seqlens, query_rows, sequence_starts, block_size, group, settings
        )
        num_items = work["item_keys"].shape[0]
        dk_partial, dv_partial = dk, dv  # unused without DETERMINISTIC
        if deterministic:
            dk_partial = dk.new_empty(num_items, config["BLOCK_S"], config["BLOCK_D"])
            dv_partial = dv.new_empty(num_items, config["BLOCK_S"], config["BLOCK_DV"])
        fitted_kernel(_selected_attention_fsa_bwd_kernel, (num_items,))(
            q=q, k=k, v=v, do=do, lse=lse, delta=delta, **work, query_rows=query_rows, dq_partial=dq_partial, dk=dk,
            dv=dv, dk_partial=dk_partial, dv_partial=dv_partial, scale=scale, first_token=first_token,
            Tq=num_queries, Tk=k.shape[1], **config, **work_config, DETERMINISTIC=deterministic,
        )
        if deterministic:
            wrap_triton(_selected_attention_fsa_dkdv_sum_kernel)[(num_items,)](
                dk_partial=dk_partial, dv_partial=dv_partial, item_keys=work["item_keys"],
                item_lengths=work["item_lengths"], sequence_starts=sequence_starts, dk=dk, dv=dv, num_items=num_items,
                Tk=k.shape[1], HKV=hkv, BS=block_size, D=config["D"], DV=config["DV"], BLOCK_S=config["BLOCK_S"],
                BLOCK_D=config["BLOCK_D"], BLOCK_DV=config["BLOCK_DV"], VARLEN=cu_seqlens is not None,
            )
        return work_config, keys

    work_config, keys = launch_fitting(
        launch, (FSA_BWD, *FSA_FALLBACKS), fitting_key("fsa_bwd", q, dict(config, DETERMINISTIC=deterministic))
    )
    block_r = max(16, work_config["GP"])
    wrap_triton(_selected_attention_fsa_dq_sum_kernel)[(triton.cdiv(num_tokens, block_r // work_config["GP"]), hkv)](
        dq_partial=dq_partial, selection_keys=keys, dq=dq, first_token=first_token, num_tokens=num_tokens,
        unread_key=k.shape[0] * hkv * k.shape[1], HKV=hkv, G=group, GP=work_config["GP"], TOPK=topk, D=q.shape[-1],
        BLOCK_R=block_r, BLOCK_D=config["BLOCK_D"],
    )


@triton_custom_op("selected_attention")
def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, block_size: int,
    scale: float | None = None, cu_seqlens: Tensor | None = None, impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, impl)
    if q.dtype == torch.float64:
        return _selected_attention_torch(q, k, v, indices, block_size, scale, cu_seqlens)
    return _selected_attention_fwd(q, k, v, indices, block_size, scale, cu_seqlens, impl)


def _selected_attention_torch(q, k, v, indices, block_size, scale, cu_seqlens):
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens)
    return torch_attention.attention_forward(q, k, v, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk)


@selected_attention.register_kernel("cpu")
def _(q, k, v, indices, block_size, scale=None, cu_seqlens=None, impl="auto"):
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, impl)
    return _selected_attention_torch(q, k, v, indices, block_size, scale, cu_seqlens)


@selected_attention.register_fake
def _(q, k, v, indices, block_size, scale=None, cu_seqlens=None, impl="auto"):
    _check_inputs(q, k, v, indices, block_size, scale, cu_seqlens, impl)
    return attention_outputs_like(q, v.shape[-1])


@triton_custom_op("selected_attention_backward")
def selected_attention_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    indices: Tensor, block_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    if q.dtype == torch.float64:
        return _selected_attention_backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens)
    return _selected_attention_bwd(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens, impl)


def _selected_attention_backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens):
    segments, select_keys, chunk = _plan(q, k, v, indices, block_size, cu_seqlens)
    return torch_attention.attention_backward(
        do, dlse, q, k, v, o, lse, resolve_scale(scale, q.shape[-1]), segments, select_keys, chunk
    )


@selected_attention_backward.register_kernel("cpu")
def _(do, dlse, q, k, v, o, lse, indices, block_size, scale=None, cu_seqlens=None, impl="auto"):
    return _selected_attention_backward_torch(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens)


@selected_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, indices, block_size, scale=None, cu_seqlens=None, impl="auto"):
    return attention_grads_like(q, k, v)


register_attention_autograd(selected_attention, selected_attention_backward)
