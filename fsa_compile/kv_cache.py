"""``NSACache``: the inference state of one ``FlashSparseAttention`` layer, so that a sequence can be fed in any
chunking (a prefill chunk, single decode tokens, another chunk) with the outputs of one full forward.

Preallocated per layer: keys after RoPE, values, compressed keys (after RoPE) and values, and the keys before RoPE
of the compression windows still open (fewer than ``kernel_size``). A compressed token is produced exactly when
its window completes, from the uncompressed keys it covers, so a step computes only the new windows.

Every sequence of the batch is at the same fill (``seqlen``, a host int: no sync). Caches of different fill need
per-sequence key lengths in the ops (``seqlens_k``), which ``SequenceLayout`` expresses but the ops do not take yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fsa_compile.compression import compress, rotary_embedding
from fsa_compile.ops import max_compressed_rows, num_compressed


class NSACache:
    """Buffers for ``layer(x, cache=cache)``; ``x [batch_size, n, hidden]`` appends n tokens.

    Args:
        layer: the ``FlashSparseAttention`` layer the cache serves.
        batch_size, max_seqlen: the most sequences and tokens it holds.
        device, dtype: of the buffers. Default: the layer's.
    """

    def __init__(self, layer, batch_size: int, max_seqlen: int, device=None, dtype=None):
        if not hasattr(layer, "compress_key"):
            raise TypeError(f"layer must be a FlashSparseAttention, got {type(layer).__name__}")
        if batch_size < 1 or max_seqlen < 1:
            raise ValueError(f"batch_size and max_seqlen must be >= 1, got {batch_size} and {max_seqlen}")
        weight = layer.k_proj.weight
        factory = dict(device=weight.device if device is None else device,
                       dtype=weight.dtype if dtype is None else dtype)
        shape = (batch_size, max_seqlen, layer.num_kv_heads, layer.head_dim)
        compressed_shape = (batch_size, max_compressed_rows(max_seqlen, layer.kernel_stride), *shape[2:])
        self.layer, self.batch_size, self.max_seqlen = layer, batch_size, max_seqlen
        self.k, self.v = torch.zeros(shape, **factory), torch.zeros(shape, **factory)
        self.k_cmp, self.v_cmp = torch.zeros(compressed_shape, **factory), torch.zeros(compressed_shape, **factory)
        self.open_keys = torch.zeros(batch_size, layer.kernel_size - 1, *shape[2:], **factory)
        self.seqlen = 0

    @property
    def num_compressed(self) -> int:
        """Compressed tokens so far: the windows that fit in ``seqlen`` tokens."""
        return num_compressed(self.seqlen, self.layer.kernel_size, self.layer.kernel_stride)

    def reset(self) -> None:
        """Empty the cache (the buffers are kept)."""
        self.seqlen = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep batch row ``rows[i]`` as row i (int64 [batch_size], repeats allowed): beam search."""
        for buffer in (self.k, self.v, self.k_cmp, self.v_cmp, self.open_keys):
            buffer.copy_(buffer.index_select(0, rows))

    def append(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Add n tokens' q, k, v ``[B, n, H, D]`` before RoPE; -> the branch inputs of ``nsa_attention`` for them: q
        (after RoPE), k, v and k_cmp, v_cmp of the whole cache so far, and ``seqlen_k``."""
        layer, batch, num_new = self.layer, q.shape[0], q.shape[1]
        if batch != self.batch_size:
            raise ValueError(f"x must have the cache's batch_size={self.batch_size} rows, got {batch}")
        start, end = self.seqlen, self.seqlen + num_new
        if end > self.max_seqlen:
            raise ValueError(f"the cache holds max_seqlen={self.max_seqlen} tokens: {start} + {num_new} do not fit")
        ks, stride = layer.kernel_size, layer.kernel_stride
        positions = torch.arange(start, end, device=q.device)
        self.k[:, start:end] = rotary_embedding(k, positions, layer.rope_theta)
        self.v[:, start:end] = v

        # Windows of tokens [first_open, end): the open ones completed by the new keys.
        compressed_before, compressed_after = self.num_compressed, num_compressed(end, ks, stride)
        first_open = compressed_before * stride
        pending = torch.cat([self.open_keys[:, : start - first_open].to(k.dtype), k], dim=1)
        if compressed_after > compressed_before:
            rows = slice(compressed_before, compressed_after)
            k_cmp = compress(pending, layer.compress_key, layer.compress_key_pos, ks, stride)
            window_ends = torch.arange(rows.start, rows.stop, device=q.device) * stride + ks - 1
            self.k_cmp[:, rows] = rotary_embedding(k_cmp, window_ends, layer.rope_theta)
            self.v_cmp[:, rows] = compress(self.v[:, first_open:end], layer.compress_value, layer.compress_value_pos,
                                           ks, stride)
        still_open = pending[:, (compressed_after - compressed_before) * stride :]
        self.open_keys[:, : still_open.shape[1]] = still_open
        self.seqlen = end
        return dict(q=rotary_embedding(q, positions, layer.rope_theta), k=self.k[:, :end], v=self.v[:, :end],
                    k_cmp=self.k_cmp[:, :compressed_after], v_cmp=self.v_cmp[:, :compressed_after], seqlen_k=end)
