"""FSA's step 1: invert the selections. ``indices`` say, per query, which KV blocks it reads; the FSA kernels loop
over KV blocks and need, per block, the queries that read it.

An *entry* is one (query token, KV head, slot) of ``indices [N, Hkv, topk]``, numbered ``(token * Hkv + h) * topk
+ slot`` from the chunk's first token. Its *selection key* is ``(b * Hkv + h) * Tk + first key row of its block``
(``B * Hkv * Tk`` for an entry that is never read: -1, out of range, or a repeat of an earlier slot). A stable
sort by key groups the entries of every block, and each block's run is cut into *work items* of at most
``rows_per_item`` entries: one program of the FSA kernels each. Everything is sync-free and sized from shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _settings
from ._kernels.index_inversion import _items_per_key_kernel, _key_runs_kernel, _work_items_kernel
from ._kernels.selected_fsa import _selection_keys_kernel
from ._launch import cdiv, launcher


class WorkItems(NamedTuple):
    """int32 tables of the FSA kernels (``_kernels/selected_fsa.py``)."""

    sorted_entries: torch.Tensor  # [E] entries in key order
    item_keys: torch.Tensor  # [items] the selection key (block) of each item
    item_starts: torch.Tensor  # [items] its first position in sorted_entries
    item_lengths: torch.Tensor  # [items] its entries (0 for a spare item)


def invert_indices(indices, first_token, num_queries, query_rows, sequence_starts, block_size, num_keys, batch,
                   num_sequences, rows_per_item) -> tuple[WorkItems, torch.Tensor]:
    """Work items of the selections ``indices [N, Hkv, topk]`` of the flattened tokens ``first_token ..
    first_token + N`` of ``[B * Tq]``, and the unsorted selection keys [E] (for the dq sum).

    query_rows, sequence_starts: int32 [Tq], the key row of each query and where its sequence starts
    (``SequenceLayout.query_rows`` / ``query_key_starts``).
    """
    _, hkv, topk = indices.shape
    device = indices.device
    num_block_keys = batch * hkv * num_keys
    # int32 keys when they fit: half the radix-sort passes of int64.
    keys = torch.empty(indices.numel(), dtype=torch.int32 if num_block_keys < 2**31 - 1 else torch.int64,
                       device=device)
    if keys.numel() > 0:
        launcher(_selection_keys_kernel, (cdiv(keys.numel(), 1024),))(
            indices, query_rows, sequence_starts, keys, first_token, keys.numel(), num_block_keys, num_queries,
            num_keys, HKV=hkv, TOPK=topk, BS=block_size, BLOCK=1024,
        )
    sorted_keys, sorted_entries = torch.sort(keys, stable=True)
    # At most E / rows_per_item full items plus one partial item per non-empty block.
    max_blocks = batch * hkv * (num_keys // block_size + num_sequences + 1)
    num_items = max(1, (keys.numel() + rows_per_item - 1) // rows_per_item + max_blocks)
    if _settings.get("fused_index_inversion") and keys.dtype == torch.int32 and keys.numel() > 0:
        items = _work_items_fused(sorted_keys, sorted_entries, num_block_keys, num_items, rows_per_item)
    else:
        items = _work_items_torch(sorted_keys, sorted_entries, num_block_keys, num_items, rows_per_item)
    return items, keys


def _work_items_torch(sorted_keys, sorted_entries, num_block_keys: int, num_items: int, rows_per_item: int):
    """WorkItems from the sorted keys in torch ops (about 25 launches)."""
    device = sorted_keys.device
    # Entries of block key j: sorted positions [entry_bounds[j], entry_bounds[j + 1]). Not a histogram by
    # index_add_: torch.compile lowers that to a sort-based index_put_ that costs ~8 ms at T=64K.
    block_keys = torch.arange(num_block_keys + 1, device=device, dtype=sorted_keys.dtype)
    entry_bounds = torch.searchsorted(sorted_keys, block_keys)
    entry_ends = entry_bounds[1:]
    counts = entry_ends - entry_bounds[:-1]
    items_per_key = (counts + rows_per_item - 1) // rows_per_item
    item_ends = items_per_key.cumsum(0)
    item = torch.arange(num_items, device=device)
    key = torch.searchsorted(item_ends, item, right=True)
    used = key < num_block_keys
    key = key.clamp(max=num_block_keys - 1)
    within = item - (item_ends[key] - items_per_key[key])
    item_starts = entry_ends[key] - counts[key] + within * rows_per_item
    item_lengths = torch.where(used, (counts[key] - within * rows_per_item).clamp(0, rows_per_item), 0)
    item_keys = torch.where(used, key, 0)
    return WorkItems(sorted_entries.to(torch.int32), item_keys.to(torch.int32), item_starts.to(torch.int32),
                     item_lengths.to(torch.int32))


def _work_items_fused(sorted_keys, sorted_entries, num_block_keys: int, num_items: int, rows_per_item: int):
    """WorkItems from int32 sorted keys in three Triton launches, two zero fills and a cumsum
    (``_kernels/index_inversion.py``). The same tables as ``_work_items_torch`` except the start of unused items
    (length 0, never read): 0 here."""
    device, num_entries = sorted_keys.device, sorted_keys.numel()
    # Separate tensors rather than views of one: under torch.compile each launch's mutated arguments must not alias.
    run_starts, run_ends = (torch.zeros(num_block_keys, dtype=torch.int32, device=device) for _ in range(2))
    entries = torch.empty(num_entries, dtype=torch.int32, device=device)
    launcher(_key_runs_kernel, (cdiv(num_entries, 1024),))(
        sorted_keys, sorted_entries, run_starts, run_ends, entries, num_entries, num_block_keys, BLOCK=1024,
    )
    items_per_key = torch.empty(num_block_keys, dtype=torch.int32, device=device)
    launcher(_items_per_key_kernel, (cdiv(num_block_keys, 1024),))(
        run_starts, run_ends, items_per_key, num_block_keys, rows_per_item, BLOCK=1024,
    )
    item_ends = torch.cumsum(items_per_key, 0, dtype=torch.int32)
    item_keys, item_starts, item_lengths = (
        torch.empty(num_items, dtype=torch.int32, device=device) for _ in range(3))
    launcher(_work_items_kernel, (cdiv(num_items, 1024),))(
        item_ends, items_per_key, run_starts, run_ends, item_keys, item_starts, item_lengths, num_items,
        num_block_keys, rows_per_item, num_block_keys.bit_length(), BLOCK=1024,
    )
    return WorkItems(entries, item_keys, item_starts, item_lengths)
