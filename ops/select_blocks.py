"""``torch.ops.fsa.select_blocks``: the top-k key blocks of every (query token, KV head).

For the query at position t and KV head h (DESIGN.md):

- ``p[hq, i] = exp(q_hq . k_cmp_i * scale - lse[hq])`` over the compressed keys t sees, summed over the G
  query heads of the group;
- block score ``s[j] = sum_i p[i] * w(i, j)``, ``w(i, j)`` = tokens shared by window
  ``[i*kernel_stride, i*kernel_stride + kernel_size)`` and block ``[j*block_size, (j+1)*block_size)``,
  divided by ``kernel_stride``;
- candidates are ``j <= t // block_size``; blocks ``j < init_blocks`` and the ``local_blocks`` blocks
  ending at ``t // block_size`` are forced in; the other slots take the highest scores (ties: lower j).

q [B, Tq, Hq, D], k_cmp [B, Tc, Hkv, D], lse [B, Tq, Hq] (the compressed attention's) -> int32
[B, Tq, Hkv, topk], ascending, ``-1`` slots last. Not differentiable.

Kernels: a fused Triton kernel (``_kernels/select_blocks.py``) on CUDA and on CPU tensors under
``TRITON_INTERPRET=1`` with the CPU kernel disabled: it never writes a score tensor. Vectorised PyTorch on CPU
and for float64.
"""

from __future__ import annotations

import torch

from . import _settings
from . import _torch_attention as torch_attention
from . import _validation as check
from ._kernels.select_blocks import _select_blocks_kernel
from ._launch import cdiv, launcher, next_power_of_2
from ._layout import SequenceLayout, visible_compressed
from ._library import define_op, resolve_scale
from .compressed_attention import visible_compressed_keys

SCHEMA = ("(Tensor q, Tensor k_cmp, Tensor lse, SymInt kernel_size, SymInt kernel_stride, SymInt block_size, "
          "SymInt topk, SymInt init_blocks, SymInt local_blocks, float? scale=None, Tensor? cu_seqlens=None, "
          "SymInt? seqlen_k=None, Tensor? cu_seqlens_k=None, Tensor? seqlens_k=None) -> Tensor")


def _check_inputs(
    q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks, scale, cu_seqlens,
    seqlen_k, cu_seqlens_k, seqlens_k,
) -> None:
    check.check_qkv(q, k_cmp, k_cmp, "k_cmp", "k_cmp")
    check.check_tensor("lse", lse, 3, "[B, Tq, Hq]")
    expected_lse = torch_attention.lse_dtype(q.dtype)
    if lse.dtype != expected_lse:
        raise TypeError(f"lse must be {expected_lse} (as compressed_attention returns it), got {lse.dtype}")
    check.check_device("lse", lse, q)
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape [B, Tq, Hq] = {list(q.shape[:3])}, got {list(lse.shape)}")
    check.check_compression(kernel_size, kernel_stride)
    check.check_positive("block_size", block_size)
    check.check_positive("topk", topk)
    check.check_positive("init_blocks", init_blocks, minimum=0)
    check.check_positive("local_blocks", local_blocks, minimum=0)
    if init_blocks + local_blocks > topk:
        raise ValueError(
            f"init_blocks + local_blocks must be <= topk, got {init_blocks} + {local_blocks} > {topk}"
        )
    check.check_cu_seqlens(cu_seqlens, q, q.shape[1], cu_seqlens_k)
    check.check_seqlens_k(seqlens_k, q, cu_seqlens)
    num_keys = check.check_seqlen_k(seqlen_k, q.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k)
    check.check_compressed_keys("k_cmp", k_cmp, q, num_keys, kernel_size, kernel_stride)


# ---- CPU path ----------------------------------------------------------------------------------------------

def _pool_onto_blocks(probs, kernel_size, kernel_stride, block_size, num_blocks):
    """Block scores from window probabilities: ``scores[..., j] = sum_i probs[..., i] * w(i, j)``.

    Window i only touches blocks ``i*kernel_stride // block_size`` onward, at most
    ``(kernel_size - 1) // block_size + 2`` of them, so this is a few ``index_add_`` calls, not a
    ``[Tc, num_blocks]`` weight matrix. probs [..., S] -> [..., num_blocks].
    """
    window_start = torch.arange(probs.shape[-1], device=probs.device) * kernel_stride
    first_block = window_start // block_size
    scores = probs.new_zeros(*probs.shape[:-1], num_blocks)
    for step in range((kernel_size - 1) // block_size + 2):
        block = first_block + step
        shared = torch.minimum(window_start + kernel_size, (block + 1) * block_size) - torch.maximum(
            window_start, block * block_size
        )
        weight = shared.clamp(min=0).to(probs.dtype) / kernel_stride
        weight = weight.masked_fill(block >= num_blocks, 0.0)
        scores.index_add_(-1, block.clamp(max=num_blocks - 1), probs * weight)
    return scores


def _select_blocks_torch(
    q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks, scale, cu_seqlens,
    seqlen_k, cu_seqlens_k, seqlens_k,
):
    batch, num_queries, hq, d = q.shape
    hkv = k_cmp.shape[2]
    group = hq // hkv
    acc = torch_attention.accumulation_dtype(q.dtype)
    scale = resolve_scale(scale, d)
    out = torch.full((batch, num_queries, hkv, topk), -1, dtype=torch.int32, device=q.device)
    layout = SequenceLayout.of(q, seqlen_k, cu_seqlens, cu_seqlens_k, seqlens_k)
    for segment in layout.compressed_segments(kernel_size, kernel_stride):
        b = segment.batch
        num_keys = segment.first_position + segment.query_end - segment.query_start
        num_cmp = segment.key_end - segment.key_start
        num_blocks = -(-num_keys // block_size)
        width = max(num_blocks, topk)
        chunk = torch_attention.chunk_size(hq * max(1, num_cmp) + hkv * width)
        for start in range(segment.query_start, segment.query_end, chunk):
            end = min(start + chunk, segment.query_end)
            n = end - start
            first = start - segment.query_start + segment.first_position
            positions = range(first, first + n)
            rows, visible = visible_compressed_keys(positions, num_cmp, kernel_size, kernel_stride, q.device)
            keys = k_cmp[b, segment.key_start + rows.start : segment.key_start + rows.stop].to(acc)  # [S, Hkv, D]
            qc = q[b, start:end].reshape(n, hkv, group, d).to(acc)
            logits = torch.einsum("chgd,shd->chgs", qc, keys) * scale
            logits = logits - lse[b, start:end].reshape(n, hkv, group, 1).to(acc)
            probs = torch.where(visible[:, None, None, :], torch.exp(logits), 0.0).sum(2)  # [C, Hkv, S]
            scores = _pool_onto_blocks(probs, kernel_size, kernel_stride, block_size, num_blocks)  # [C, Hkv, nb]
            scores = torch.nn.functional.pad(scores, (0, width - num_blocks), value=float("-inf"))

            last_block = (torch.arange(first, first + n, device=q.device) // block_size).view(n, 1, 1)
            out[b, start:end] = _top_blocks(scores, last_block, topk, init_blocks, local_blocks)
    return out


def _top_blocks(scores, last_block, topk: int, init_blocks: int, local_blocks: int):
    """The selection rule on block scores ``[..., width]`` (width >= topk) of queries whose own block is
    ``last_block`` (broadcast): forced blocks first, then the highest scores among the causal ones, ties to the lower
    block; int32 ``[..., topk]`` ascending, ``-1`` last."""
    width = scores.shape[-1]
    block_ids = torch.arange(width, device=scores.device)
    candidate = block_ids <= last_block
    forced = candidate & ((block_ids < init_blocks) | (block_ids > last_block - local_blocks))
    scores = scores.masked_fill(~candidate, float("-inf")).masked_fill(forced, float("inf"))
    # A stable descending sort keeps the lower block first among equal scores.
    ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    chosen = torch.sort(order[..., :topk].masked_fill(ranked[..., :topk] == float("-inf"), width), dim=-1).values
    return chosen.masked_fill(chosen == width, -1).to(torch.int32)


# ---- CUDA path ---------------------------------------------------------------------------------------------

def _tiles(q, num_cmp, kernel_size, kernel_stride, tile_tokens, layout):
    """int32 tables of the token tiles, each inside one sequence: first flattened row, end row of its sequence,
    position of its first token, first compressed row of its sequence. Built on the device, sized from shapes
    (packed: a bound on the number of tiles; the spare tiles are empty)."""
    batch, num_queries, device = q.shape[0], q.shape[1], q.device
    if not layout.packed:
        per_row = cdiv(num_queries, tile_tokens)
        tile = torch.arange(batch * per_row, device=device)
        b, start = tile // per_row, (tile % per_row) * tile_tokens
        tables = (b * num_queries + start, (b + 1) * num_queries, start + layout.query_offset, b * num_cmp)
    else:
        bounds = layout.query_bounds
        lengths = bounds[1:] - bounds[:-1]
        tiles_per_sequence = (lengths + tile_tokens - 1) // tile_tokens
        tile_ends = tiles_per_sequence.cumsum(0)
        tile = torch.arange(cdiv(num_queries, tile_tokens) + lengths.shape[0], device=device)
        sequence = torch.searchsorted(tile_ends, tile, right=True).clamp(max=lengths.shape[0] - 1)
        start = (tile - (tile_ends - tiles_per_sequence)[sequence]) * tile_tokens
        end = bounds[1:][sequence]
        first = torch.where(tile < tile_ends[-1], bounds[:-1][sequence] + start, end)
        position = start + layout.first_positions[sequence]
        tables = (first, end, position, layout.compressed_sequences(kernel_size, kernel_stride)[1][sequence])
    return [t.to(torch.int32) for t in tables]


def _window_steps(kernel_size, kernel_stride, block_size, blocks_wanted):
    """(BLOCK_C, NBT): compressed keys loaded per step and the whole blocks their windows cover.

    Blocks [J, J + n) need the windows ``ceil((J*bs - ks + 1)/stride) .. ((J + n)*bs - 1) // stride``, at most
    ``(n*bs + ks - 2) // stride + 2`` of them. Take the smallest BLOCK_C giving half the wanted blocks.
    """
    block_c = 16
    while True:
        covered = ((block_c - 2) * kernel_stride - kernel_size + 2) // block_size
        if covered >= max(1, blocks_wanted // 2) or block_c >= 256 and covered >= 1:
            return block_c, min(blocks_wanted, covered)
        block_c *= 2


def _select_blocks_few_queries(q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks,
                               local_blocks, scale, layout):
    """The selection of a few queries per batch row (decode), sync-free PyTorch with the CPU path's rules: the
    Triton kernel gives a (row, KV head) one program that walks all Tc compressed keys alone (268 us of a 390 us
    decode step at 128K, batch 1, H100), here the scores of all of them are one batched matmul."""
    batch, num_queries, hq, d = q.shape
    hkv = k_cmp.shape[2]
    positions = layout.query_positions.expand(batch, num_queries)
    visible = torch.arange(k_cmp.shape[1], device=q.device) < visible_compressed(
        positions, kernel_size, kernel_stride)[..., None]  # [B, Tq, Tc]
    logits = torch.einsum("bthgd,bshd->bthgs", q.view(batch, num_queries, hkv, hq // hkv, d).float(), k_cmp.float())
    logits = logits * resolve_scale(scale, d) - lse.view(batch, num_queries, hkv, hq // hkv, 1)
    probs = torch.where(visible[:, :, None, None, :], torch.exp(logits), 0.0).sum(3)  # [B, Tq, Hkv, Tc]
    width = max(cdiv(layout.num_keys, block_size), topk)
    scores = _pool_onto_blocks(probs, kernel_size, kernel_stride, block_size, width)
    return _top_blocks(scores, (positions // block_size)[..., None, None], topk, init_blocks, local_blocks)


def _select_blocks_triton(
    q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks, scale, cu_seqlens,
    seqlen_k, cu_seqlens_k, seqlens_k,
):
    shape = (*q.shape[:2], k_cmp.shape[2], topk)
    layout = SequenceLayout.of(q, seqlen_k, cu_seqlens, cu_seqlens_k, seqlens_k)
    if not layout.packed and 0 < q.shape[1] <= _settings.get("select_blocks_few_queries"):
        return _select_blocks_few_queries(q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks,
                                          local_blocks, scale, layout)
    layout, (q, k_cmp, lse) = layout.for_kernels(q.contiguous(), k_cmp.contiguous(), lse.contiguous(),
                                                 compressed_rows=k_cmp.shape[1])
    batch, num_queries, hq, d = q.shape
    hkv = k_cmp.shape[2]
    group = hq // hkv
    group_padded = next_power_of_2(group, minimum=1)
    settings = _settings.get("select_blocks", q.dtype, group, d)[0]
    tile_tokens = max(16, settings["rows"] // group_padded)
    topk_padded = next_power_of_2(topk)
    block_c, blocks_per_step = _window_steps(kernel_size, kernel_stride, block_size, topk_padded)
    tables = _tiles(q, k_cmp.shape[1], kernel_size, kernel_stride, tile_tokens, layout)
    indices = torch.empty(batch, num_queries, hkv, topk, dtype=torch.int32, device=q.device)
    if q.numel() == 0:
        return indices.view(shape)
    launcher(_select_blocks_kernel, (tables[0].shape[0], hkv))(
        q, k_cmp, lse, *tables, indices, resolve_scale(scale, d),
        HQ=hq, HKV=hkv, G=group, GP=group_padded, D=d, BLOCK_D=next_power_of_2(d), KERNEL_SIZE=kernel_size,
        KERNEL_STRIDE=kernel_stride, BS=block_size, TOPK=topk, TOPKP=topk_padded, INIT_BLOCKS=init_blocks,
        LOCAL_BLOCKS=local_blocks, BLOCK_T=tile_tokens, BLOCK_C=block_c, NBT=blocks_per_step,
        INPUT_PRECISION=_settings.input_precision(q.dtype), num_warps=settings["num_warps"],
        num_stages=settings["num_stages"],
    )
    return indices.view(shape)


# ---- registration ------------------------------------------------------------------------------------------

select_blocks = define_op(
    "select_blocks", SCHEMA, check=_check_inputs, torch_impl=_select_blocks_torch, triton_impl=_select_blocks_triton,
    fake=lambda q, k_cmp, lse, ks, stride, block_size, topk, *_: q.new_empty(
        q.shape[0], q.shape[1], k_cmp.shape[2], topk, dtype=torch.int32),
)
