"""Packed-sequence bookkeeping on the device, shared by the kernel launchers: sync-free, sized from shapes."""

from __future__ import annotations

import torch


def token_sequences(num_queries: int, num_keys: int, cu_seqlens, device):
    """int64 [Tq]: (position of each query token within its sequence, index of its sequence or None).

    Without ``cu_seqlens`` every batch row is one sequence whose queries are its last Tq of Tk tokens.
    """
    tokens = torch.arange(num_queries, device=device)
    if cu_seqlens is None:
        return tokens + (num_keys - num_queries), None
    bounds = cu_seqlens.long()
    # Not searchsorted(bounds[1:], ...): Inductor's CUDA lowering rejects sliced boundaries.
    sequence = (torch.searchsorted(bounds, tokens, right=True) - 1).clamp(0, bounds.shape[0] - 2)
    return tokens - bounds[sequence], sequence


def compressed_sequences(cu_seqlens, kernel_size: int, kernel_stride: int):
    """int64 [N]: (compressed keys of each packed sequence, its first row in the packed compressed layout)."""
    bounds = cu_seqlens.long()
    lengths = bounds[1:] - bounds[:-1]
    counts = torch.where(lengths >= kernel_size, (lengths - kernel_size) // kernel_stride + 1, 0)
    return counts, counts.cumsum(0) - counts
