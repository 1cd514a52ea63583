"""Where every query and key token sits: one object per call that every op, launcher, CPU path and
``fsa_compile.compress`` asks for token positions, sequence spans and the compressed-row layout.

Three layouts, as in FlashAttention:

- **batched**: each of the B rows is one sequence of Tk keys whose queries are the last Tq of them
  (bottom-right aligned: query i sits at position ``Tk - Tq + i``);
- **packed**: B == 1, ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 [N+1]) give each sequence's query rows and key
  rows; a sequence's queries are the last of its keys. ``cu_seqlens_k`` defaults to ``cu_seqlens_q`` (Tq == Tk);
- **batched caches**: ``seqlens_k`` (int32 [B]) keys are filled in row b; its Tq queries are the last Tq of them.
  The masked kernels take per-row span tables; select_blocks and selected attention run it as one packed row of
  B sequences whose key spans are the B buffers (``flattened``).

Device tables are computed on first use, sync-free and sized from shapes only, so the CUDA paths stay
capturable by CUDA graphs. Offsets are first made safe to index with (``sequence_bounds``): the CUDA paths cannot
check their values without a host sync, and a bad value must not become an out-of-bounds read. The host view
(``segments``) reads and checks the offsets; only the CPU kernels use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def num_compressed(num_keys, kernel_size: int, kernel_stride: int):
    """Tc = max(0, (Tk - kernel_size) // kernel_stride + 1): the windows that fit in Tk keys."""
    # A branch (a guard ``Tk >= kernel_size`` under dynamic shapes) rather than sym_max: Max(0, ...) keeps
    # the shape solver from proving Tc >= 1, which breaks torch.export with a dynamic T.
    if num_keys < kernel_size:
        return 0
    return (num_keys - kernel_size) // kernel_stride + 1


def max_compressed_rows(num_keys, kernel_stride: int):
    """The most compressed rows an op accepts: ``Tk // kernel_stride + 2`` (>= Tc + 1 for any Tk >= 0, and >= 2).

    A compressed tensor of this many rows (zeros after the first Tc) has a shape that needs no branch on whether
    Tk reaches kernel_size, so torch.export can trace one program for every T >= 1 (``FlashSparseAttention``)."""
    return num_keys // kernel_stride + 2


def visible_compressed(position, kernel_size: int, kernel_stride: int):
    """How many compressed keys the query at ``position`` sees (int or tensor): key i is visible iff
    ``position >= i*kernel_stride + kernel_size - 1``, its whole window in the query's past."""
    count = (position - kernel_size + 1) // kernel_stride + 1
    return count.clamp(min=0) if isinstance(count, torch.Tensor) else max(0, count)


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens") -> list[int]:
    """Read cu_seqlens (host sync: CPU path and ``fsa_compile.check_cu_seqlens`` only) and check its values: starts
    at 0, non-decreasing, ends at ``total``. Returns them as a list."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at T={total}, got {bounds}")
    return bounds


def sequence_bounds(cu_seqlens, total: int) -> torch.Tensor:
    """int64 [N+1]: cu_seqlens clamped to [0, total], made non-decreasing (a bound below an earlier one repeats
    it, so that sequence is empty), first 0 and last ``total``. Well-formed cu_seqlens come back unchanged."""
    bounds = torch.cummax(cu_seqlens.long().clamp(0, total), 0).values
    return torch.cat([torch.zeros_like(bounds[:1]), bounds[1:-1], torch.full_like(bounds[:1], total)])


class Segment(NamedTuple):
    """One sequence on the host (CPU kernels): queries ``[query_start, query_end)`` of batch row ``batch`` see key
    rows ``[key_start, key_end)``; ``first_position`` is the position of its first query within the sequence."""

    batch: int
    query_start: int
    query_end: int
    key_start: int
    key_end: int
    first_position: int


def _table(compute):
    """A property computed on first use and kept for the call (not functools.cached_property: its lock in Python
    3.11 stops torch.compile from tracing the layer)."""
    name = compute.__name__

    def get(self):
        if name not in self._tables:
            self._tables[name] = compute(self)
        return self._tables[name]

    return property(get, doc=compute.__doc__)


class SequenceLayout:
    """The token layout of one call (see the module docstring).

    Args:
        batch, num_queries, num_keys: B, Tq, Tk of ``q [B, Tq, ...]`` and ``k [B, Tk, ...]``.
        device: where the device tables live.
        cu_seqlens_q, cu_seqlens_k: int32 [N+1] packed offsets (B == 1); ``cu_seqlens_k`` defaults to
            ``cu_seqlens_q``.
        seqlens_k: int32 [B] filled keys per batch row (a batch of caches); default: all Tk.
    """

    def __init__(self, batch: int, num_queries: int, num_keys: int, device, cu_seqlens_q=None, cu_seqlens_k=None,
                 seqlens_k=None):
        if seqlens_k is not None and cu_seqlens_q is not None:
            raise ValueError("seqlens_k is for batched caches; packed sequences take cu_seqlens_k")
        self.batch, self.num_queries, self.num_keys, self.device = batch, num_queries, num_keys, device
        self.cu_seqlens_q = cu_seqlens_q
        self.cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        self.seqlens_k = seqlens_k
        self._tables = {}
        self._compressed_rows_per_sequence = 0  # set by flattened()

    @classmethod
    def of(cls, q: torch.Tensor, num_keys: int | None = None, cu_seqlens=None, cu_seqlens_k=None,
           seqlens_k=None) -> SequenceLayout:
        """The layout of ``q [B, Tq, ...]`` against ``num_keys`` keys (default Tq), packed by ``cu_seqlens`` (and
        ``cu_seqlens_k`` for the keys), or a batch of caches filled to ``seqlens_k``."""
        num_keys = q.shape[1] if num_keys is None else num_keys
        return cls(q.shape[0], q.shape[1], num_keys, q.device, cu_seqlens, cu_seqlens_k, seqlens_k)

    def for_kernels(self, *tensors: torch.Tensor | None, compressed_rows: int = 0):
        """(layout, tensors) as the CUDA kernels take them: this layout and the tensors unchanged, or for batched
        caches the ``flattened`` layout and ``[B, T, ...] -> [1, B*T, ...]`` views of the tensors (the kernels'
        outputs then need a ``view`` back to B rows)."""
        if self.seqlens_k is None:
            return self, list(tensors)
        return self.flattened(compressed_rows), flatten_batch(*tensors)

    def flattened(self, compressed_rows: int = 0) -> SequenceLayout:
        """Batched caches as one packed row (B == 1) of B sequences: sequence b has the queries ``[b*Tq, (b+1)*Tq)``
        and the key rows ``[b*Tk, b*Tk + seqlens_k[b])`` of its buffer; its compressed keys start at row
        ``b * compressed_rows``. select_blocks and selected attention run caches through their packed kernels on
        the flattened tensors (``for_kernels``); the tables are the same sync-free device tables. (Not the masked
        kernels: a tile of their queries would span every row's buffer.)"""
        batch, num_queries, num_keys = self.batch, self.num_queries, self.num_keys
        starts = torch.arange(batch + 1, device=self.device, dtype=torch.int32)
        flat = SequenceLayout(1, batch * num_queries, batch * num_keys, self.device, starts * num_queries,
                              starts * num_keys)
        flat._tables["key_lengths"] = self.fill
        flat._compressed_rows_per_sequence = compressed_rows
        return flat

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def query_offset(self) -> int:
        """Tk - Tq: the position of a batched row's first query (bottom-right alignment)."""
        return self.num_keys - self.num_queries

    @property
    def num_sequences(self) -> int:
        """N packed sequences, or B batch rows (shape-only)."""
        return self.cu_seqlens_q.shape[0] - 1 if self.packed else self.batch

    # ---- device tables (sync-free) ------------------------------------------------------------------------

    @_table
    def query_bounds(self) -> torch.Tensor:
        """int64 [N+1]: the packed query rows of each sequence, made safe to index with."""
        return sequence_bounds(self.cu_seqlens_q, self.num_queries)

    @_table
    def key_bounds(self) -> torch.Tensor:
        """int64 [N+1]: the packed key rows of each sequence, made safe to index with."""
        if self.cu_seqlens_k is self.cu_seqlens_q and self.num_keys == self.num_queries:
            return self.query_bounds
        return sequence_bounds(self.cu_seqlens_k, self.num_keys)

    @_table
    def query_sequence(self) -> torch.Tensor | None:
        """int64 [Tq]: the packed sequence of each query row; None when batched."""
        if not self.packed:
            return None
        rows = torch.arange(self.num_queries, device=self.device)
        bounds = self.query_bounds
        # Not searchsorted(bounds[1:], ...): Inductor's CUDA lowering rejects sliced boundaries.
        return (torch.searchsorted(bounds, rows, right=True) - 1).clamp(0, bounds.shape[0] - 2)

    @_table
    def fill(self) -> torch.Tensor | None:
        """int64 [B]: filled keys per batch row (``seqlens_k``, at least Tq and at most Tk); None otherwise."""
        if self.seqlens_k is None:
            return None
        return self.seqlens_k.long().clamp(self.num_queries, self.num_keys)

    @_table
    def key_lengths(self) -> torch.Tensor:
        """int64 [N] (packed): keys of each sequence (fewer than its key span in a ``flattened`` layout)."""
        return self.key_bounds[1:] - self.key_bounds[:-1]

    @_table
    def first_positions(self) -> torch.Tensor:
        """int64 [N] (packed): position of each sequence's first query, its keys less its queries."""
        num_queries = self.query_bounds[1:] - self.query_bounds[:-1]
        return (self.key_lengths - num_queries).clamp(min=0)

    @_table
    def query_positions(self) -> torch.Tensor:
        """int64 [Tq] (``[B, Tq]`` with seqlens_k): position of each query within its sequence."""
        if self.fill is None and not self.packed:
            return torch.arange(self.query_offset, self.num_keys, device=self.device)
        rows = torch.arange(self.num_queries, device=self.device)
        if self.fill is not None:
            return self.fill[:, None] - self.num_queries + rows
        sequence = self.query_sequence
        return rows - self.query_bounds[sequence] + self.first_positions[sequence]

    @_table
    def query_key_starts(self) -> torch.Tensor:
        """int64 [Tq]: the key row where each query's sequence starts (0 when batched)."""
        if not self.packed:
            return torch.zeros(self.num_queries, dtype=torch.long, device=self.device)
        return self.key_bounds[self.query_sequence]

    @_table
    def query_rows(self) -> torch.Tensor:
        """int64 [Tq]: the key row at each query's own position (its sequence's start + its position)."""
        return self.query_key_starts + self.query_positions

    @_table
    def _keys(self) -> SequenceLayout:
        """The keys' own layout (queries = keys)."""
        return SequenceLayout(self.batch, self.num_keys, self.num_keys, self.device, self.cu_seqlens_k)

    @_table
    def key_positions(self) -> torch.Tensor:
        """int64 [Tk]: position of each key within its sequence."""
        return self._keys.query_positions

    @_table
    def key_starts(self) -> torch.Tensor:
        """int64 [Tk]: the first key row of each key's sequence (0 when batched)."""
        return self._keys.query_key_starts

    def compressed_sequences(self, kernel_size: int, kernel_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [N] each: compressed keys of each packed sequence and its first row in the packed compressed layout
        (``fsa_compile.compress``'s: sequences one after another, zero rows after them; a ``flattened`` layout's:
        one buffer of ``compressed_rows`` rows per sequence)."""
        counts = visible_compressed(self.key_lengths - 1, kernel_size, kernel_stride)  # the windows its last key sees
        if self._compressed_rows_per_sequence:
            return counts, torch.arange(counts.shape[0], device=self.device) * self._compressed_rows_per_sequence
        return counts, counts.cumsum(0) - counts

    def compressed_rows(self, kernel_size: int, kernel_stride: int, num_rows=None):
        """Where every compressed row of the keys comes from: (first_token [R] long, position [R] long, valid [R]
        bool) for ``R = num_rows`` rows (default Tc of Tk): the first key row of the row's window, the position
        within its sequence of the window's last token, and whether the row holds a window (packed layouts and rows
        past Tc are zero)."""
        if num_rows is None:
            num_rows = num_compressed(self.num_keys, kernel_size, kernel_stride)
        if not self.packed:
            first = torch.arange(0, num_rows * kernel_stride, kernel_stride, device=self.device)
            return first, first + (kernel_size - 1), first <= self.num_keys - kernel_size
        rows = torch.arange(num_rows, device=self.device)
        counts, first_rows = self.compressed_sequences(kernel_size, kernel_stride)
        # Boundaries must not be a slice: Inductor's CUDA searchsorted lowering cannot take a SliceView.
        sequence = torch.searchsorted(first_rows + counts, rows, right=True)
        valid = sequence < counts.shape[0]
        sequence = sequence.clamp(max=counts.shape[0] - 1)
        local = (rows - first_rows[sequence]) * kernel_stride
        return self.key_bounds[sequence] + local, local + kernel_size - 1, valid

    def window_spans(self, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [Tq] each: the key rows ``[lo, hi)`` of sliding-window attention, keys ``t - window_size < s <= t``
        of the query's own sequence."""
        positions, start = self.query_positions, self.query_key_starts
        return start + (positions - window_size + 1).clamp(min=0), start + positions + 1

    def compressed_spans(self, kernel_size: int, kernel_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [Tq] each: the compressed key rows ``[lo, hi)`` each query sees (``visible_compressed``) in the
        compressed layout of ``compressed_sequences``."""
        visible = visible_compressed(self.query_positions, kernel_size, kernel_stride)
        if not self.packed:
            return torch.zeros_like(visible), visible
        first_row = self.compressed_sequences(kernel_size, kernel_stride)[1][self.query_sequence]
        return first_row, first_row + visible

    # ---- host view (CPU kernels: reads and checks the offsets) ------------------------------------------------

    def segments(self) -> list[Segment]:
        """One ``Segment`` per batch row or non-empty packed sequence, key rows in k."""
        return self._segments(lambda start, end: (start, end))

    def compressed_segments(self, kernel_size: int, kernel_stride: int) -> list[Segment]:
        """As ``segments``, with key rows in the compressed layout of ``compressed_sequences``."""
        rows_before = [0]

        def compressed(start, end):
            if not self.packed:  # every batch row has its own compressed keys
                return 0, num_compressed(end - start, kernel_size, kernel_stride)
            first = rows_before[0]
            rows_before[0] += num_compressed(end - start, kernel_size, kernel_stride)
            return first, rows_before[0]

        return self._segments(compressed)

    def _checked_fills(self) -> list[int]:
        fills = self.seqlens_k.tolist()
        if any(not self.num_queries <= n <= self.num_keys for n in fills):
            raise ValueError(f"seqlens_k must be in [Tq, Tk] = [{self.num_queries}, {self.num_keys}] (the queries are "
                             f"the last Tq filled keys of each row), got {fills}")
        return fills

    def _segments(self, key_rows) -> list[Segment]:
        """``key_rows(key_start, key_end)`` maps a sequence's key rows in k to the rows a segment reads; it is
        called for every sequence in order, empty ones included."""
        if not self.packed:
            fills = [self.num_keys] * self.batch if self.seqlens_k is None else self._checked_fills()
            return [Segment(b, 0, self.num_queries, *key_rows(0, n), n - self.num_queries)
                    for b, n in enumerate(fills)]
        if self.cu_seqlens_k is self.cu_seqlens_q:  # the ops' one cu_seqlens
            queries = keys = check_cu_seqlens_values(self.cu_seqlens_q, self.num_queries)
        else:
            queries = check_cu_seqlens_values(self.cu_seqlens_q, self.num_queries, "cu_seqlens_q")
            keys = check_cu_seqlens_values(self.cu_seqlens_k, self.num_keys, "cu_seqlens_k")
        segments = []
        for q_start, q_end, k_start, k_end in zip(queries[:-1], queries[1:], keys[:-1], keys[1:]):
            rows = key_rows(k_start, k_end)
            if q_end > q_start:
                segments.append(Segment(0, q_start, q_end, *rows, max(0, (k_end - k_start) - (q_end - q_start))))
        return segments


def flatten_batch(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``[B, T, ...] -> [1, B*T, ...]`` (views of contiguous tensors; None stays None): the tensors of a
    ``flattened`` layout."""
    return [None if x is None else x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]) for x in tensors]
