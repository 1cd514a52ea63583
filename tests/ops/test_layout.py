"""SequenceLayout: token positions, sequence spans and compressed rows, on the device and on the host, for the
batched, packed (Tq == Tk and Tq < Tk) and batched-cache layouts, checked against a plain Python walk."""

import pytest
import torch

from fsa_compile.ops import SequenceLayout
from fsa_compile.ops._layout import num_compressed
from tests._testing import DEVICE, make_cu_seqlens


def expected_layout(query_lengths, key_lengths):
    """Per packed query row: (position, key row of its sequence's start), by walking the sequences."""
    positions, starts, key_start = [], [], 0
    for num_queries, num_keys in zip(query_lengths, key_lengths):
        positions += [num_keys - num_queries + i for i in range(num_queries)]
        starts += [key_start] * num_queries
        key_start += num_keys
    return positions, starts


def test_positions_restart_per_sequence_and_compressed_rows():
    cu = make_cu_seqlens((5, 12, 0, 9), "cpu")
    layout = SequenceLayout(1, 26, 26, "cpu", cu)
    assert layout.query_positions.tolist() == list(range(5)) + list(range(12)) + list(range(9))
    first, position, valid = layout.compressed_rows(4, 4)
    # Windows: sequence 0 (5 tokens) -> 1, sequence 1 (12) -> 3, sequence 3 (9) -> 2; Tc bound = 6.
    assert first[valid].tolist() == [0, 5, 9, 13, 17, 21]
    assert position[valid].tolist() == [3, 3, 7, 11, 3, 7]
    assert valid.tolist() == [True] * 6


@pytest.mark.parametrize("query_lengths,key_lengths", [((5, 12, 0, 9), (5, 12, 0, 9)), ((1, 3, 0, 2), (7, 3, 4, 40))],
                         ids=["Tq=Tk", "Tq<Tk"])
def test_packed_tables_match_a_walk_over_the_sequences(query_lengths, key_lengths):
    cu_q, cu_k = make_cu_seqlens(query_lengths), make_cu_seqlens(key_lengths)
    layout = SequenceLayout(1, sum(query_lengths), sum(key_lengths), DEVICE, cu_q, cu_k)
    positions, starts = expected_layout(query_lengths, key_lengths)
    assert layout.query_positions.tolist() == positions
    assert layout.query_key_starts.tolist() == starts
    assert layout.query_rows.tolist() == [s + p for s, p in zip(starts, positions)]
    # The host view agrees with the device tables.
    for segment in layout.segments():
        rows = range(segment.query_start, segment.query_end)
        assert [positions[r] for r in rows] == list(range(segment.first_position, segment.first_position + len(rows)))
        assert segment.key_end - segment.key_start == segment.first_position + len(rows)
    lo, hi = layout.window_spans(3)
    assert (hi - lo).tolist() == [min(3, p + 1) for p in positions]
    assert (hi - 1).tolist() == layout.query_rows.tolist()  # the query's own key is the last it sees


@pytest.mark.parametrize("kernel_size,kernel_stride", [(4, 2), (5, 5)])
def test_compressed_spans_and_segments_agree(kernel_size, kernel_stride):
    lengths = (9, 0, 4, 17)
    layout = SequenceLayout(1, sum(lengths), sum(lengths), DEVICE, make_cu_seqlens(lengths))
    lo, hi = layout.compressed_spans(kernel_size, kernel_stride)
    counts, first_rows = layout.compressed_sequences(kernel_size, kernel_stride)
    assert counts.tolist() == [num_compressed(n, kernel_size, kernel_stride) for n in lengths]
    segments = layout.compressed_segments(kernel_size, kernel_stride)
    for segment in segments:
        rows = slice(segment.query_start, segment.query_end)
        assert set(lo[rows].tolist()) == {segment.key_start}
        assert hi[rows].max().item() == segment.key_end  # the last query of a sequence sees all its windows
    visible = [(p - kernel_size + 1) // kernel_stride + 1 if p >= kernel_size - 1 else 0
               for p in layout.query_positions.tolist()]
    assert (hi - lo).tolist() == visible


def test_batched_caches_of_different_fill():
    """seqlens_k: row b holds seqlens_k[b] keys; its queries are the last Tq of them."""
    seqlens_k = torch.tensor([7, 3, 10], dtype=torch.int32, device=DEVICE)
    layout = SequenceLayout(3, 3, 10, DEVICE, seqlens_k=seqlens_k)
    assert layout.query_positions.tolist() == [[4, 5, 6], [0, 1, 2], [7, 8, 9]]
    assert [(s.key_start, s.key_end, s.first_position) for s in layout.segments()] == [(0, 7, 4), (0, 3, 0),
                                                                                       (0, 10, 7)]
    with pytest.raises(ValueError, match="seqlens_k is for batched caches"):
        SequenceLayout(1, 3, 10, DEVICE, make_cu_seqlens((3,)), seqlens_k=seqlens_k)


def test_batched_queries_are_bottom_right_aligned():
    layout = SequenceLayout.of(torch.empty(2, 3, 1, 1, device=DEVICE), 8)
    assert layout.query_offset == 5 and layout.query_positions.tolist() == [5, 6, 7]
    assert [s.first_position for s in layout.segments()] == [5, 5]


def test_malformed_offsets_give_tables_in_range():
    cu = torch.tensor([-5, 40, 20, 3], dtype=torch.int32, device=DEVICE)  # negative, past the end, decreasing
    layout = SequenceLayout(1, 30, 30, DEVICE, cu)
    for table in (layout.query_positions, layout.query_rows, *layout.window_spans(4),
                  *layout.compressed_spans(4, 2)):
        assert table.min().item() >= 0 and table.max().item() <= 30
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, be non-decreasing and end at T=30"):
        layout.segments()


def test_batched_rows_each_have_their_own_compressed_keys():
    layout = SequenceLayout(2, 3, 20, DEVICE)
    assert [(s.batch, s.key_start, s.key_end, s.first_position) for s in layout.compressed_segments(4, 2)] == [
        (0, 0, 9, 17), (1, 0, 9, 17)]
    lo, hi = layout.compressed_spans(4, 2)
    assert lo.tolist() == [0, 0, 0] and hi.tolist() == [8, 8, 9]
