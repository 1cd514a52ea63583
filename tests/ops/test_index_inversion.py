"""The FSA index inversion: the work-item tables of the fused kernels (setting ``fused_index_inversion``) equal the
torch ops' tables, and selected attention run on them matches the reference, forward and backward."""

import pytest
import torch

from fsa_compile import reference
from fsa_compile.ops import SequenceLayout, _settings
from fsa_compile.ops._index_inversion import invert_indices
from tests._testing import (
    DEVICE, Case, check_attention, deterministic_algorithms, make_cu_seqlens, make_indices, selected_attention_path,
)

# (batch, Tq, Tk, Hkv, block_size, topk, sequence lengths (packed) or None, rows per item, first flattened token)
INVERSIONS = [
    (2, 63, 63, 2, 16, 3, None, 4, 0),
    (1, 100, 100, 4, 32, 2, None, 1, 0),
    (2, 37, 100, 2, 16, 4, None, 8, 0),  # fewer queries than keys
    (1, 161, 161, 2, 16, 5, (33, 0, 67, 61), 4, 0),  # packed, with an empty sequence
    (2, 90, 90, 1, 8, 6, None, 16, 50),  # a chunk that starts inside the flattened tokens
    (1, 200, 200, 2, 64, 4, None, 64, 0),  # every run fits one item
    pytest.param((1, 8192, 8192, 4, 64, 16, None, 64, 0), marks=pytest.mark.gpu),
    pytest.param((1, 3001, 3001, 2, 64, 8, (1000, 1, 2000), 32, 1024), marks=pytest.mark.gpu),
]


def _tables(fused: bool, batch, num_queries, num_keys, hkv, block_size, topk, lengths, rows_per_item, first_token):
    torch.manual_seed(0)
    cu_seqlens = None if lengths is None else make_cu_seqlens(lengths)
    indices = make_indices(batch, num_queries, num_keys, hkv, block_size, topk, cu_seqlens)
    layout = SequenceLayout(batch, num_queries, num_keys, DEVICE, cu_seqlens)
    flat = indices.view(batch * num_queries, hkv, topk)[first_token:]
    with _settings.override("fused_index_inversion", fused):
        items, keys = invert_indices(
            flat, first_token, num_queries, layout.query_rows.to(torch.int32),
            layout.query_key_starts.to(torch.int32), block_size, num_keys, batch,
            layout.num_sequences if layout.packed else 1, rows_per_item,
        )
    return items, keys


@pytest.mark.parametrize("case", INVERSIONS, ids=lambda c: "-".join(map(str, c[:6])) + ("-packed" if c[6] else "")
                         + f"-from{c[8]}")
def test_fused_work_items_equal_the_torch_ones(case):
    want, want_keys = _tables(False, *case)
    got, got_keys = _tables(True, *case)
    assert torch.equal(got_keys, want_keys)
    assert all(t.dtype == torch.int32 for t in got), [t.dtype for t in got]
    assert torch.equal(got.sorted_entries, want.sorted_entries)
    assert torch.equal(got.item_keys, want.item_keys)
    assert torch.equal(got.item_lengths, want.item_lengths)
    used = want.item_lengths > 0
    assert used.any() and not used.all()  # the cases have spare items
    assert torch.equal(got.item_starts[used], want.item_starts[used])  # unused items' starts are never read


@pytest.mark.parametrize("case", [
    Case(2, 63, 63, 2, 2, 16, 16),
    Case(1, 161, 161, 4, 2, 64, 48, (33, 0, 67, 61)),
    Case(2, 37, 100, 4, 2, 32, 32),
], ids=lambda c: c.id)
@pytest.mark.parametrize("deterministic", [False, True])
def test_selected_attention_on_fused_work_items_equals_the_reference(case, deterministic):
    q, k, v, cu = case.inputs(torch.float32)
    indices = make_indices(case.batch, case.num_queries, case.num_keys, case.hkv, 16, 3, cu)
    with (selected_attention_path("fsa") as impl, _settings.override("fused_index_inversion", True),
          deterministic_algorithms(deterministic)):
        out = torch.ops.fsa.selected_attention(q, k, v, indices, 16, None, cu, impl)
        check_attention(
            out, lambda q, k, v: reference.selected_attention(q, k, v, indices, 16, None, cu), (q, k, v),
            torch.float32,
        )
