"""``NSACache``: the inference state of one ``FlashSparseAttention`` layer, so that a sequence can be fed in any
chunking (a prefill chunk, single decode tokens, another chunk) with the outputs of one full forward.

Preallocated per layer: keys after RoPE, values, compressed keys (after RoPE) and values, a ring of the last
``kernel_size`` keys before RoPE (what a compression window still needs) and the fill of every sequence
(``seqlens``, int32 [B] on the device). A compressed token is produced exactly when its window completes, from the
uncompressed keys it covers, so a step computes only the new windows.

Every step has static shapes: the ops read the whole buffers with ``seqlens_k`` (the fills after the step), the
cache is updated by index writes at device positions, and nothing reads a device value on the host. So a decode
step can be captured once in a CUDA graph and replayed as the cache fills (``CUDAGraphStep``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fsa_compile.compression import compress_windows, rotary_embedding, rotary_embeddings
from fsa_compile.ops import max_compressed_rows


class NSACache:
    """Buffers for ``layer(x, cache=cache)``; ``x [batch_size, n, hidden]`` appends n tokens to every row.

    Args:
        layer: the ``FlashSparseAttention`` layer the cache serves.
        batch_size, max_seqlen: the most sequences and tokens per sequence it holds.
        device, dtype: of the buffers. Default: the layer's.
    Attributes:
        seqlens: int32 [batch_size], tokens held by each row (on the device).
        seqlen: host int, tokens appended so far (the most any row holds): bounds ``max_seqlen`` without a sync.
    """

    def __init__(self, layer, batch_size: int, max_seqlen: int, device=None, dtype=None):
        if not hasattr(layer, "compress_key"):
            raise TypeError(f"layer must be a FlashSparseAttention, got {type(layer).__name__}")
        if batch_size < 1 or max_seqlen < 1:
            raise ValueError(f"batch_size and max_seqlen must be >= 1, got {batch_size} and {max_seqlen}")
        weight = layer.k_proj.weight
        factory = dict(device=weight.device if device is None else device,
                       dtype=weight.dtype if dtype is None else dtype)
        heads = (layer.num_kv_heads, layer.head_dim)
        compressed_rows = max_compressed_rows(max_seqlen, layer.kernel_stride)
        self.layer, self.batch_size, self.max_seqlen = layer, batch_size, max_seqlen
        self.k, self.v = (torch.zeros(batch_size, max_seqlen, *heads, **factory) for _ in range(2))
        self.k_cmp, self.v_cmp = (torch.zeros(batch_size, compressed_rows, *heads, **factory) for _ in range(2))
        # Position p before RoPE in slot p % kernel_size; the last slot takes the writes that must not land.
        self.recent_keys = torch.zeros(batch_size, layer.kernel_size + 1, *heads, **factory)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=factory["device"])
        self.seqlen = 0

    def reset(self) -> None:
        """Empty the cache (the buffers are kept)."""
        self.seqlens.zero_()
        self.seqlen = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep batch row ``rows[i]`` as row i (int64 [batch_size], repeats allowed): beam search."""
        for buffer in (self.k, self.v, self.k_cmp, self.v_cmp, self.recent_keys, self.seqlens):
            buffer.copy_(buffer.index_select(0, rows))

    def append(self, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        """Add n tokens' q, k, v ``[B, n, H, D]`` (before RoPE) to every row; -> the inputs of ``nsa_attention`` for
        them: q after RoPE, the whole buffers, ``seqlen_k`` (their length) and ``seqlens_k`` (the fills with the new
        tokens).

        lengths: int [B] (device), the new tokens row b really has (right-padded prompts): its fill grows by
        ``lengths[b]``; the outputs of its padding are meaningless and its keys are overwritten later. Default: n.
        """
        layer, (batch, num_new) = self.layer, q.shape[:2]
        if batch != self.batch_size:
            raise ValueError(f"x must have the cache's batch_size={self.batch_size} rows, got {batch}")
        self._reserve(num_new)
        fill = self.seqlens.long()
        # A device tensor either way: a Python int would become a host-to-device copy, which a CUDA graph forbids.
        added = torch.full_like(fill, num_new) if lengths is None else lengths.long().clamp(0, num_new)
        positions = fill[:, None] + torch.arange(num_new, device=q.device)  # [B, n]
        rows = torch.arange(batch, device=q.device)[:, None]
        q, k_rotated = rotary_embeddings((q, k), positions, layer.rope_theta)
        self.k[rows, positions] = k_rotated
        self.v[rows, positions] = v
        self._compress_completed_windows(k, fill, fill + added, rows)
        self._remember_recent_keys(k, fill, added, rows)
        self.seqlens.copy_(fill + added)
        return dict(q=q, k=self.k, v=self.v, k_cmp=self.k_cmp,
                    v_cmp=self.v_cmp, seqlen_k=self.max_seqlen, seqlens_k=(fill + num_new).to(torch.int32))

    # Host bookkeeping outside torch.compile: traced, the growing int would be a guard and recompile every step.
    @torch.compiler.disable
    def _reserve(self, num_new: int) -> None:
        """Count ``num_new`` more tokens (host side), or raise if they do not fit."""
        if self.seqlen + num_new > self.max_seqlen:
            raise ValueError(f"the cache holds max_seqlen={self.max_seqlen} tokens: {self.seqlen} + {num_new} do "
                             f"not fit")
        self.seqlen += num_new

    def _compress_completed_windows(self, k: Tensor, fill: Tensor, end: Tensor, rows: Tensor) -> None:
        """Compress the windows that end in ``[fill, end)`` of each row: ``(n - 1) // stride + 1`` candidates per row,
        the ones that do not complete written to a spare row (past every window, never read)."""
        layer, num_new = self.layer, k.shape[1]
        ks, stride = layer.kernel_size, layer.kernel_stride
        first_window = torch.div(fill - ks + 1 + stride - 1, stride, rounding_mode="floor").clamp(min=0)
        window = first_window[:, None] + torch.arange((num_new - 1) // stride + 1, device=k.device)  # [B, W]
        window_end = window * stride + ks - 1
        offsets = torch.arange(ks, device=k.device)
        # Keys before RoPE of positions fill - ks .. fill + n - 1: the ring (in position order), then the new ones.
        ring_slots = (fill[:, None] - ks + offsets) % ks
        recent = torch.cat([self.recent_keys[rows, ring_slots], k.to(self.k.dtype)], dim=1)
        in_recent = (window * stride - fill[:, None] + ks)[..., None] + offsets  # [B, W, ks]
        key_windows = recent[rows[..., None], in_recent.clamp(0, recent.shape[1] - 1)]
        value_windows = self.v[rows[..., None], ((window * stride)[..., None] + offsets).clamp(max=self.max_seqlen - 1)]
        k_cmp = compress_windows(key_windows, layer.compress_key, layer.compress_key_pos)
        v_cmp = compress_windows(value_windows, layer.compress_value, layer.compress_value_pos)
        target = torch.where(window_end < end[:, None], window, self.k_cmp.shape[1] - 1)
        self.k_cmp[rows, target] = rotary_embedding(k_cmp, window_end, layer.rope_theta).to(self.k_cmp.dtype)
        self.v_cmp[rows, target] = v_cmp.to(self.v_cmp.dtype)

    def _remember_recent_keys(self, k: Tensor, fill: Tensor, added: Tensor, rows: Tensor) -> None:
        """The ring keeps each row's last ``kernel_size`` real keys before RoPE (not its padding)."""
        ks = self.layer.kernel_size
        kept = min(k.shape[1], ks)
        index = added[:, None] - kept + torch.arange(kept, device=k.device)
        slots = torch.where(index >= 0, (fill[:, None] + index) % ks, ks)
        self.recent_keys[rows, slots] = k[rows, index.clamp(min=0)].to(self.recent_keys.dtype)


class CUDAGraphStep:
    """A cache step captured once in a CUDA graph and replayed as the caches fill: ``step(x)`` returns what
    ``fn(x)`` would, for inputs of ``example``'s shape (a decode step: one token per row).

    ``fn(x)`` must append x's tokens to every cache of ``caches`` and return a tensor, e.g.
    ``CUDAGraphStep(lambda tokens: model(tokens, cache=caches), caches, tokens[:, -1:])``; ``torch.compile(fn)``
    fuses the step's many small ops first (capture then records the compiled kernels). Capture runs ``fn`` a
    few times at the caches' current fill and then restores the fill (what it wrote past the fill is overwritten
    by the next real step). ``step(x)`` copies x into the graph's input, replays, advances the caches' host
    ``seqlen`` and returns the graph's output tensor (overwritten by the next replay: clone it to keep it).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], caches: list[NSACache], example: Tensor, warmup: int = 2):
        self.caches = list(caches)
        self.num_new = example.shape[1]
        self._check_room()
        self.input = example.clone()
        fills = [(cache.seqlens.clone(), cache.seqlen) for cache in self.caches]

        def restore():
            for cache, (seqlens, seqlen) in zip(self.caches, fills):
                cache.seqlens.copy_(seqlens)
                cache.seqlen = seqlen

        # Warm up on a side stream (Triton compiles, launch settings are chosen), as torch.cuda.graphs advises.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(self.input)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.output = fn(self.input)
        restore()

    def _check_room(self) -> None:
        for cache in self.caches:
            if cache.seqlen + self.num_new > cache.max_seqlen:
                raise ValueError(f"the cache holds max_seqlen={cache.max_seqlen} tokens: {cache.seqlen} + "
                                 f"{self.num_new} do not fit")

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape != self.input.shape:
            raise ValueError(f"x must have the captured shape {tuple(self.input.shape)}, got {tuple(x.shape)}")
        self._check_room()
        self.input.copy_(x)
        self.graph.replay()
        for cache in self.caches:
            cache.seqlen += self.num_new
        return self.output
