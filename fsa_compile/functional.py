"""Functional entry points: thin, documented wrappers over ``torch.ops.fsa.*`` plus the gated NSA combination.

Tensor conventions (DESIGN.md): token-major ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``; query i sits at
position ``Tk - Tq + i``; ``cu_seqlens`` (int32 [N+1], B == 1) packs independent sequences, whose keys are the
same tokens unless ``cu_seqlens_k`` packs them on their own (each sequence's queries the last of its keys);
``seqlens_k`` (int32 [B]) makes ``k, v`` a batch of caches: row b holds ``seqlens_k[b]`` keys, its queries are the
last Tq of them (the buffers' rows past it are never read; static shapes for CUDA graphs); query head h uses KV
head ``h // (Hq // Hkv)``; ``scale`` defaults to ``D ** -0.5``; ``lse`` is float32.
Every op validates its inputs and raises ``ValueError``/``TypeError`` before any kernel runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fsa_compile import _compiled_glue
from fsa_compile.ops import check_argument_types, check_cu_seqlens_tensor, check_cu_seqlens_values  # registers the ops


def check_cu_seqlens(cu_seqlens: Tensor, total: int) -> None:
    """Raise ``ValueError`` unless cu_seqlens is int32 [N+1], starts at 0, is non-decreasing and ends at ``total``.

    Reads the values, so it synchronises with the device: call it where an error is worth a sync (data loading,
    debugging). The ops check values only on CPU; on CUDA they never read out of bounds whatever cu_seqlens
    holds (a bound outside ``[0, total]`` is clamped into it, a decreasing one makes its sequence empty), but the
    result of a malformed cu_seqlens is not meaningful.
    """
    check_argument_types(ints=(("total", total),))
    check_cu_seqlens_tensor(cu_seqlens)
    check_cu_seqlens_values(cu_seqlens, total)


def compressed_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kernel_size: int, kernel_stride: int,
    scale: float | None = None, cu_seqlens: Tensor | None = None, seqlen_k: int | None = None,
    cu_seqlens_k: Tensor | None = None, seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention over compressed keys; query t sees key i iff ``t >= i*kernel_stride + kernel_size - 1``.

    Args:
        q: [B, Tq, Hq, D].
        k_cmp, v_cmp: [B, Tc, Hkv, D] / [B, Tc, Hkv, Dv] from ``compress``,
            ``Tc = max(0, (Tk - kernel_size) // kernel_stride + 1)``; up to ``Tk // kernel_stride + 2`` rows are
            accepted, the rows past Tc are never read (their gradients are zero).
        kernel_size, kernel_stride: the compression windows (``kernel_stride <= kernel_size``).
        scale: softmax scale. Default: ``D ** -0.5``.
        cu_seqlens: int32 [N+1] for packed sequences. Default: None.
        seqlen_k: number of uncompressed keys Tk when Tq < Tk (with cu_seqlens_k: the packed keys' total).
            Default: None (Tk = Tq).
        cu_seqlens_k: int32 [N+1] offsets of the packed uncompressed keys when they are not the queries' (each
            sequence's queries are the last of its keys; k_cmp packed by these sequences). Default: None.
        seqlens_k: int32 [B] keys filled in each row of a batch of caches (``seqlen_k`` is then the buffers'
            length Tk); row b's compressed keys are the first rows of ``k_cmp[b]``. Default: None.
    Returns:
        o [B, Tq, Hq, Dv] (0 where nothing is visible), lse [B, Tq, Hq] float32 (-inf there).
    """
    check_argument_types(
        tensors=(("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)),
        optional_tensors=(("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k), ("seqlens_k", seqlens_k)),
        ints=(("kernel_size", kernel_size), ("kernel_stride", kernel_stride)), optional_ints=(("seqlen_k", seqlen_k),),
        scale=scale,
    )
    return torch.ops.fsa.compressed_attention(
        q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k
    )


def select_blocks(
    q: Tensor, k_cmp: Tensor, lse: Tensor, kernel_size: int, kernel_stride: int, block_size: int, topk: int,
    init_blocks: int = 1, local_blocks: int = 2, scale: float | None = None, cu_seqlens: Tensor | None = None,
    seqlen_k: int | None = None, cu_seqlens_k: Tensor | None = None, seqlens_k: Tensor | None = None,
) -> Tensor:
    """Top-k key blocks per (query, KV head) ranked by compressed attention probabilities.

    Args:
        q: [B, Tq, Hq, D]; k_cmp: [B, Tc, Hkv, D]; lse: [B, Tq, Hq] float32 from ``compressed_attention``.
        block_size, topk: selection block size and number of blocks per query.
        init_blocks: leading blocks always selected. Default: 1.
        local_blocks: blocks ending at the query's own block, always selected. Default: 2.
        cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k: as for ``compressed_attention``.
    Returns:
        int32 [B, Tq, Hkv, topk], ascending, ``-1`` for empty slots (last). Not differentiable.
    """
    check_argument_types(
        tensors=(("q", q), ("k_cmp", k_cmp), ("lse", lse)),
        optional_tensors=(("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k), ("seqlens_k", seqlens_k)),
        ints=(("kernel_size", kernel_size), ("kernel_stride", kernel_stride), ("block_size", block_size),
              ("topk", topk), ("init_blocks", init_blocks), ("local_blocks", local_blocks)),
        optional_ints=(("seqlen_k", seqlen_k),), scale=scale,
    )
    return torch.ops.fsa.select_blocks(
        q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks, scale,
        cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k,
    )


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, block_size: int,
    scale: float | None = None, cu_seqlens: Tensor | None = None, impl: str = "auto",
    cu_seqlens_k: Tensor | None = None, seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact causal attention over the key blocks ``indices[b, t, h // G]``.

    Args:
        q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] / [B, Tk, Hkv, Dv].
        indices: int32 [B, Tq, Hkv, topk] block numbers, ascending, ``-1`` last; out-of-range = ``-1``.
        block_size: tokens per block.
        impl: CUDA kernel: ``"fsa"`` (KV-block-centric), ``"nsa"`` (query-centric) or ``"auto"`` (FSA for
            G < 16 and the whole backward, NSA otherwise). Ignored on CPU. Default: ``"auto"``.
        cu_seqlens_k: int32 [N+1] offsets of the packed keys when they are not the queries' (each sequence's
            queries are the last of its keys). Default: None.
        seqlens_k: int32 [B] keys filled in each row of a batch of caches. Default: None.
    Returns:
        o [B, Tq, Hq, Dv], lse [B, Tq, Hq] float32.
    """
    check_argument_types(
        tensors=(("q", q), ("k", k), ("v", v), ("indices", indices)),
        optional_tensors=(("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k), ("seqlens_k", seqlens_k)),
        ints=(("block_size", block_size),), scale=scale,
    )
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str ('auto', 'fsa' or 'nsa'), got {type(impl).__name__}")
    return torch.ops.fsa.selected_attention(q, k, v, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k,
                                            seqlens_k)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None, seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal attention over the last ``window_size`` keys: query t sees ``t - window_size < s <= t``.

    ``cu_seqlens_k``, ``seqlens_k``: as for ``selected_attention``.

    Returns:
        o [B, Tq, Hq, Dv], lse [B, Tq, Hq] float32.
    """
    check_argument_types(
        tensors=(("q", q), ("k", k), ("v", v)),
        optional_tensors=(("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k), ("seqlens_k", seqlens_k)),
        ints=(("window_size", window_size),), scale=scale,
    )
    return torch.ops.fsa.sliding_window_attention(q, k, v, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k)


def nsa_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, *,
    kernel_size: int, kernel_stride: int, block_size: int, topk: int, init_blocks: int, local_blocks: int,
    window_size: int, scale: float | None = None, cu_seqlens: Tensor | None = None, impl: str = "auto",
    seqlen_k: int | None = None, cu_seqlens_k: Tensor | None = None, seqlens_k: Tensor | None = None,
) -> Tensor:
    """The three NSA branches combined: ``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``.

    Args:
        q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] (after RoPE); k_cmp, v_cmp: [B, Tc, Hkv, D] (from ``compress``).
        gates: [B, Tq, Hq, 3] branch weights (already through the sigmoid), ordered (cmp, slc, win).
        impl: the selected-attention kernel (``selected_attention``'s ``impl``). Default: ``"auto"``.
        seqlen_k: Tk when queries are the last Tq < Tk tokens (a KV cache); must equal ``k.shape[1]``.
            Default: None (Tq = Tk).
        cu_seqlens_k: packed keys of their own (``selected_attention``'s); needs ``seqlen_k``. Default: None.
        seqlens_k: int32 [B], a batch of caches (``selected_attention``'s); needs ``seqlen_k``. Default: None.
    Returns:
        [B, T, Hq, Dv] in q's dtype.
    """
    if seqlen_k is not None and seqlen_k != k.shape[1]:
        raise ValueError(f"seqlen_k must equal k.shape[1]={k.shape[1]}, got {seqlen_k}")
    o_cmp, lse_cmp = compressed_attention(
        q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k
    )
    indices = select_blocks(
        q, k_cmp, lse_cmp, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks, scale,
        cu_seqlens, seqlen_k, cu_seqlens_k, seqlens_k,
    )
    o_slc, _ = selected_attention(q, k, v, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k, seqlens_k)
    o_win, _ = sliding_window_attention(q, k, v, window_size, scale, cu_seqlens, cu_seqlens_k, seqlens_k)
    return (_combine_compiled if _compiled_glue.applies(q) else _combine)(gates, o_cmp, o_slc, o_win)


def _combine(gates: Tensor, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor) -> Tensor:
    """``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` in the branches' dtype."""
    gates = gates.to(o_cmp.dtype)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win


_combine_compiled = _compiled_glue.compiled(_combine)
