"""The work-item tables of the FSA kernels from the sorted selection keys: three launches, two zero fills and a
cumsum (``ops/_index_inversion.py``, setting ``fused_index_inversion``).

A *key* is a selected KV block (``(b * HKV + h) * Tk + first key row``); ``num_block_keys`` marks entries never read.
Key j's entries are one run of the sorted keys, cut into ``cdiv(count_j, rows_per_item)`` work items; items are
numbered key by key, so item i belongs to the first key whose inclusive item count (``item_ends``) exceeds i.
"""

import triton
import triton.language as tl


@triton.jit
def _key_runs_kernel(
    sorted_keys, sorted_positions, run_starts, run_ends, sorted_entries, num_entries, num_block_keys,
    BLOCK: tl.constexpr,
):
    """run_starts[j] / run_ends[j]: first and one-past-last position of key j's run in ``sorted_keys [E]`` (left
    at zero for keys nobody selected); ``sorted_entries``: ``sorted_positions`` (int64) as int32."""
    position = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = position < num_entries
    key = tl.load(sorted_keys + position, mask=in_range, other=num_block_keys)
    previous = tl.load(sorted_keys + position - 1, mask=in_range & (position > 0), other=-1)
    following = tl.load(sorted_keys + position + 1, mask=position + 1 < num_entries, other=num_block_keys)
    read = in_range & (key < num_block_keys)
    tl.store(run_starts + key, position.to(tl.int32), mask=read & (previous != key))
    tl.store(run_ends + key, (position + 1).to(tl.int32), mask=read & (following != key))
    entries = tl.load(sorted_positions + position, mask=in_range, other=0)
    tl.store(sorted_entries + position, entries.to(tl.int32), mask=in_range)


@triton.jit
def _items_per_key_kernel(run_starts, run_ends, items_per_key, num_block_keys, rows_per_item, BLOCK: tl.constexpr):
    """items_per_key[j] = cdiv(count_j, rows_per_item)."""
    key = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = key < num_block_keys
    count = tl.load(run_ends + key, mask=in_range, other=0) - tl.load(run_starts + key, mask=in_range, other=0)
    tl.store(items_per_key + key, (count + rows_per_item - 1) // rows_per_item, mask=in_range)


@triton.jit
def _work_items_kernel(
    item_ends, items_per_key, run_starts, run_ends, item_keys, item_starts, item_lengths, num_items,
    num_block_keys, rows_per_item, search_steps, BLOCK: tl.constexpr,
):
    """Per item i: its key (a binary search of ``item_ends`` in ``search_steps >= log2(num_block_keys + 1)``
    halvings), its first sorted position and its length; unused items (past the last key's) get key 0, start 0,
    length 0."""
    item = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = item < num_items
    low = tl.zeros([BLOCK], dtype=tl.int32)
    high = tl.zeros([BLOCK], dtype=tl.int32) + num_block_keys
    for _ in range(search_steps):  # the first key whose item_ends exceeds the item
        active = in_range & (low < high)
        middle = low + (high - low) // 2
        ends = tl.load(item_ends + middle, mask=active, other=0)
        after = ends <= item
        low = tl.where(active & after, middle + 1, low)
        high = tl.where(active & ~after, middle, high)
    used = in_range & (low < num_block_keys)
    key = tl.minimum(low, num_block_keys - 1)
    run_start = tl.load(run_starts + key, mask=used, other=0)
    count = tl.load(run_ends + key, mask=used, other=0) - run_start
    first_item = tl.load(item_ends + key, mask=used, other=0) - tl.load(items_per_key + key, mask=used, other=0)
    within = item - first_item  # the item's index among its key's items
    length = tl.minimum(tl.maximum(count - within * rows_per_item, 0), rows_per_item)
    tl.store(item_keys + item, tl.where(used, key, 0), mask=in_range)
    tl.store(item_starts + item, tl.where(used, run_start + within * rows_per_item, 0), mask=in_range)
    tl.store(item_lengths + item, tl.where(used, length, 0), mask=in_range)
