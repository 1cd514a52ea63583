"""``FlashSparseAttention``: an NSA attention layer (projections, compression, RoPE, gates, three branches)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsa_compile import _compiled_glue
from fsa_compile.compression import compress, rotary_embedding, rotary_embeddings
from fsa_compile.functional import nsa_attention
from fsa_compile.kv_cache import NSACache
from fsa_compile.ops import SELECTED_IMPLS, SequenceLayout, max_compressed_rows


class FlashSparseAttention(nn.Module):
    """Native Sparse Attention layer with the FSA selected-attention kernel.

    ``o = o_proj(g_cmp * o_cmp + g_slc * o_slc + g_win * o_win)`` with per-query-head gates
    ``g = sigmoid(gate_proj(x))``. Keys and values are compressed before RoPE; compressed keys get the RoPE
    position of their window's last token.

    Args:
        hidden_size: model width.
        num_heads, num_kv_heads: query heads Hq and KV heads Hkv (``Hq % Hkv == 0``).
        head_dim: D (even, for RoPE).
        kernel_size, kernel_stride: compression windows. Default: 32, 16.
        block_size, topk: selected blocks. Default: 64, 16.
        init_blocks, local_blocks: always-selected leading / local blocks. Default: 1, 2.
        window_size: sliding window. Default: 512.
        rope_theta: RoPE base. Default: 10000.
        impl: the selected-attention kernel on CUDA, ``"auto"``, ``"fsa"`` or ``"nsa"`` (see
            ``fsa_compile.selected_attention``). Default: ``"auto"``.
    Shapes:
        forward(x [B, T, hidden_size], cu_seqlens: int32 [N+1] or None) -> [B, T, hidden_size];
        with cu_seqlens, x is packed as [1, total, hidden_size]. With ``cache=NSACache(layer, ...)``, x's tokens
        follow the cached ones and are appended to the cache (inference); ``lengths`` (int [B], with a cache)
        says how many of x's n tokens each row really has (right-padded prompts of different lengths).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, kernel_size: int = 32,
        kernel_stride: int = 16, block_size: int = 64, topk: int = 16, init_blocks: int = 1,
        local_blocks: int = 2, window_size: int = 512, rope_theta: float = 10000.0, impl: str = "auto",
        device=None, dtype=None,
    ):
        super().__init__()
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number (RoPE), got {head_dim}")
        if init_blocks + local_blocks > topk:
            raise ValueError(f"init_blocks + local_blocks must be <= topk, got {init_blocks} + {local_blocks} > {topk}")
        if not 0 < kernel_stride <= kernel_size:
            raise ValueError(f"need 0 < kernel_stride <= kernel_size, got {kernel_stride} and {kernel_size}")
        if impl not in SELECTED_IMPLS:
            raise ValueError(f"impl must be one of {SELECTED_IMPLS}, got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.kernel_size, self.kernel_stride = kernel_size, kernel_stride
        self.block_size, self.topk = block_size, topk
        self.init_blocks, self.local_blocks, self.window_size = init_blocks, local_blocks, window_size
        self.rope_theta, self.impl = rope_theta, impl
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **factory)
        self.gate_proj = nn.Linear(hidden_size, num_heads * 3, bias=True, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **factory)
        compress_shape = (num_kv_heads, kernel_size * head_dim, head_dim)
        pos_shape = (num_kv_heads, kernel_size, head_dim)
        self.compress_key = nn.Parameter(torch.empty(compress_shape, **factory))
        self.compress_key_pos = nn.Parameter(torch.empty(pos_shape, **factory))
        self.compress_value = nn.Parameter(torch.empty(compress_shape, **factory))
        self.compress_value_pos = nn.Parameter(torch.empty(pos_shape, **factory))
        self.reset_compression()

    @torch.no_grad()
    def reset_compression(self) -> None:
        """Start compression as mean pooling over each window, with zero position embeddings."""
        pooling = torch.eye(self.head_dim).repeat(self.kernel_size, 1) / self.kernel_size  # [ks*D, D]
        for weight in (self.compress_key, self.compress_value):
            weight.copy_(pooling.expand_as(weight))
        self.compress_key_pos.zero_()
        self.compress_value_pos.zero_()

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, kernel_size={self.kernel_size}, kernel_stride={self.kernel_stride}, "
            f"block_size={self.block_size}, topk={self.topk}, window_size={self.window_size}, impl={self.impl!r}"
        )

    def project(self, x: Tensor, cu_seqlens: Tensor | None = None) -> dict[str, Tensor]:
        """The inputs of the three branches: q, k, v (after RoPE), k_cmp, v_cmp and gates [B, T, Hq, 3].

        k_cmp and v_cmp have Tc rows, or ``T // kernel_stride + 2`` (zero after the first Tc) for a symbolic T.
        In eager mode on CUDA with the setting ``compiled_glue`` this runs through ``torch.compile``
        (``fsa_compile._compiled_glue``)."""
        self._check_input(x)
        args = (x, *self._projection_weights(), self.compress_key, self.compress_key_pos, self.compress_value,
                self.compress_value_pos, cu_seqlens)
        config = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                      kernel_size=self.kernel_size, kernel_stride=self.kernel_stride, rope_theta=self.rope_theta)
        return (_project_compiled if _compiled_glue.applies(x) else _project)(*args, **config)

    def _projection_weights(self) -> tuple[Tensor, ...]:
        return (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.gate_proj.weight,
                self.gate_proj.bias)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, cache: NSACache | None = None,
                lengths: Tensor | None = None) -> Tensor:
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("a cache takes batched x [B, n, hidden], not packed sequences (cu_seqlens)")
            self._check_input(x)
            q, kv, gates = _heads(x, *self._projection_weights(), self.num_heads, self.num_kv_heads, self.head_dim)
            k, v = kv.split(self.num_kv_heads, dim=2)
            branches = dict(cache.append(q, k, v, lengths), gates=gates)
        elif lengths is not None:
            raise ValueError("lengths is for appending right-padded rows to a cache; pass cache=")
        else:
            branches = self.project(x, cu_seqlens)
        o = nsa_attention(
            **branches, kernel_size=self.kernel_size, kernel_stride=self.kernel_stride, block_size=self.block_size,
            topk=self.topk, init_blocks=self.init_blocks, local_blocks=self.local_blocks,
            window_size=self.window_size, cu_seqlens=cu_seqlens, impl=self.impl,
        )
        return self.o_proj(o.flatten(2))


def _heads(x, q_weight, k_weight, v_weight, gate_weight, gate_bias, num_heads: int, num_kv_heads: int,
           head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, T, Hq, D], kv [B, T, 2 * Hkv, D] (keys then values, before RoPE), gates [B, T, Hq, 3]."""
    batch, num_tokens, _ = x.shape
    # One matmul for q, k and v (one pass over x forward, one dx product backward).
    q, kv = F.linear(x, torch.cat([q_weight, k_weight, v_weight])).split(
        [q_weight.shape[0], k_weight.shape[0] + v_weight.shape[0]], dim=-1)
    q = q.view(batch, num_tokens, num_heads, head_dim)
    kv = kv.view(batch, num_tokens, 2 * num_kv_heads, head_dim)
    gates = torch.sigmoid(F.linear(x, gate_weight, gate_bias)).view(batch, num_tokens, num_heads, 3)
    return q, kv, gates


def _project(x, q_weight, k_weight, v_weight, gate_weight, gate_bias, compress_key, compress_key_pos,
             compress_value, compress_value_pos, cu_seqlens, *, num_heads: int, num_kv_heads: int, head_dim: int,
             kernel_size: int, kernel_stride: int, rope_theta: float) -> dict[str, Tensor]:
    """``FlashSparseAttention.project`` as a function of tensors and ints (no module: one compiled graph serves
    every layer of a shape)."""
    q, kv, gates = _heads(x, q_weight, k_weight, v_weight, gate_weight, gate_bias, num_heads, num_kv_heads, head_dim)
    batch, num_tokens, _ = x.shape
    # A symbolic T (torch.export, dynamic=True) gets T // stride + 2 compressed rows, zero past Tc: Tc itself
    # would branch on T >= kernel_size, and export could not cover T from 1. A concrete T gets Tc.
    rows = max_compressed_rows(num_tokens, kernel_stride) if isinstance(num_tokens, torch.SymInt) else None
    # Keys and values compressed in one pass, as 2 * Hkv heads: half the eager kernels, forward and backward.
    weight, pos_emb = torch.cat([compress_key, compress_value]), torch.cat([compress_key_pos, compress_value_pos])
    kv_cmp = compress(kv, weight, pos_emb, kernel_size, kernel_stride, cu_seqlens, rows)
    k_cmp, v_cmp = kv_cmp.split(num_kv_heads, dim=2)
    k, v = kv.split(num_kv_heads, dim=2)

    layout = SequenceLayout(batch, num_tokens, num_tokens, x.device, cu_seqlens)
    _, cmp_positions, _ = layout.compressed_rows(kernel_size, kernel_stride, rows)
    q, k = rotary_embeddings((q, k), layout.query_positions, rope_theta)
    k_cmp = rotary_embedding(k_cmp, cmp_positions, rope_theta)
    # v contiguous once here rather than copied by each branch op.
    return dict(q=q, k=k, v=v.contiguous(), k_cmp=k_cmp, v_cmp=v_cmp, gates=gates)


_project_compiled = _compiled_glue.compiled(_project)
