"""Packed-sequence bookkeeping on the device, shared by the kernel launchers: sync-free, sized from shapes.

Every table that reaches a kernel derives from ``sequence_bounds``, which makes any ``cu_seqlens`` safe to index
with: the CUDA paths cannot check its values without a host sync, and a bad value must not become an
out-of-bounds read (``fsa_compile.check_cu_seqlens`` checks them, with a sync, for users who want an error).
"""

from __future__ import annotations

import torch


def sequence_bounds(cu_seqlens, total: int) -> torch.Tensor:
    """int64 [N+1]: cu_seqlens clamped to [0, total], made non-decreasing (a bound below an earlier one repeats
    it, so that sequence is empty), first 0 and last ``total``. Well-formed cu_seqlens come back unchanged."""
    bounds = torch.cummax(cu_seqlens.long().clamp(0, total), 0).values
    return torch.cat([torch.zeros_like(bounds[:1]), bounds[1:-1], torch.full_like(bounds[:1], total)])


def token_sequences(num_queries: int, num_keys: int, cu_seqlens, device):
    """int64 [Tq] each: (position of each query token within its sequence, index of its sequence or None, row in
    k where its sequence starts).

    Without ``cu_seqlens`` every batch row is one sequence whose queries are its last Tq of Tk tokens.
    """
    tokens = torch.arange(num_queries, device=device)
    if cu_seqlens is None:
        return tokens + (num_keys - num_queries), None, torch.zeros_like(tokens)
    bounds = sequence_bounds(cu_seqlens, num_queries)
    # Not searchsorted(bounds[1:], ...): Inductor's CUDA lowering rejects sliced boundaries.
    sequence = (torch.searchsorted(bounds, tokens, right=True) - 1).clamp(0, bounds.shape[0] - 2)
    start = bounds[sequence]
    return tokens - start, sequence, start


def compressed_sequences(cu_seqlens, total: int, kernel_size: int, kernel_stride: int):
    """int64 [N]: (compressed keys of each packed sequence, its first row in the packed compressed layout)."""
    bounds = sequence_bounds(cu_seqlens, total)
    lengths = bounds[1:] - bounds[:-1]
    counts = torch.where(lengths >= kernel_size, (lengths - kernel_size) // kernel_stride + 1, 0)
    return counts, counts.cumsum(0) - counts
