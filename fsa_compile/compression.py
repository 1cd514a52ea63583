"""Key/value compression and rotary embeddings in plain PyTorch, so Inductor sees and fuses them (on CPU the
window gather is one opaque op, see ``compression_windows``).

No host synchronisation: packed (``cu_seqlens``) layouts are resolved on the device (``SequenceLayout``).
"""

from __future__ import annotations

import torch

from fsa_compile.lowerings import compression_windows as windows_workaround
from fsa_compile.ops import SequenceLayout, num_compressed


def compression_windows(x, tokens, pos_emb):
    """[B, H, Tc, kernel_size * D]: ``flatten_j(x[:, tokens[i, j], h] + pos_emb[h, j])``, tokens [Tc, kernel_size].

    On ``windows_workaround.OPAQUE_WINDOW_DEVICES`` (CPU) through the opaque ``torch.ops.fsa.compression_windows``:
    Inductor's C++ backend miscompiles the backward of the plain gather (``fsa_compile.lowerings``). Elsewhere
    plain PyTorch, which Inductor fuses into one kernel (gather, position add and layout).
    """
    if x.device.type in windows_workaround.OPAQUE_WINDOW_DEVICES:
        return torch.ops.fsa.compression_windows(x, tokens, pos_emb)
    windows = x[:, tokens] + pos_emb.transpose(0, 1)  # [B, Tc, ks, H, D]
    return windows.permute(0, 3, 1, 2, 4).flatten(3)


def compress(x, weight, pos_emb, kernel_size: int, kernel_stride: int, cu_seqlens=None, num_rows=None):
    """Compress windows of ``kernel_size`` tokens (stride ``kernel_stride``) with a learned linear map.

    ``out[i, h] = flatten(x[window_i, h] + pos_emb[h]) @ weight[h]``; windows never cross a sequence.

    Args:
        x: [B, T, H, D] keys or values (before RoPE).
        weight: [H, kernel_size * D, Dout].
        pos_emb: [H, kernel_size, D] intra-window position embedding.
        cu_seqlens: optional int32 [N+1] (B == 1); compressed sequences are then packed one after another.
        num_rows: rows of the result, from Tc to ``T // kernel_stride + 2`` (the ops accept any of them); the rows
            past the windows are zero. Default: Tc.
    Returns:
        [B, num_rows, H, Dout], ``Tc = max(0, (T - kernel_size) // kernel_stride + 1)`` by default; packed
        layouts end with zero rows.
    """
    _, num_tokens, heads, dim = x.shape
    if weight.shape != (heads, kernel_size * dim, weight.shape[-1]):
        raise ValueError(f"weight must be [H, kernel_size * D, Dout] = [{heads}, {kernel_size * dim}, Dout], "
                         f"got {list(weight.shape)}")
    if pos_emb.shape != (heads, kernel_size, dim):
        raise ValueError(f"pos_emb must be [H, kernel_size, D] = [{heads}, {kernel_size}, {dim}], "
                         f"got {list(pos_emb.shape)}")
    if _chunks_apply(num_tokens, kernel_size, kernel_stride, cu_seqlens, num_rows):
        return _compress_chunks(x, weight, pos_emb, kernel_size, kernel_stride)
    layout = SequenceLayout(x.shape[0], num_tokens, num_tokens, x.device, cu_seqlens)
    first, _, valid = layout.compressed_rows(kernel_size, kernel_stride, num_rows)
    tokens = (first[:, None] + torch.arange(kernel_size, device=x.device)).clamp(max=max(num_tokens - 1, 0))
    windows = compression_windows(x, tokens, pos_emb)  # [B, H, Tc, ks * D]
    # A broadcast matmul rather than einsum: einsum's internal reshapes add shape guards that break
    # torch.export with a dynamic T.
    out = torch.matmul(windows, weight).transpose(1, 2).contiguous()  # [B, Tc, H, Dout]
    if cu_seqlens is not None or num_rows is not None:
        out = out * valid.view(1, -1, 1, 1).to(out.dtype)
    return out


def _chunks_apply(num_tokens, kernel_size: int, kernel_stride: int, cu_seqlens, num_rows) -> bool:
    """Whether ``compress`` runs ``_compress_chunks``: whole sequences, Tc rows, kernel_stride dividing kernel_size."""
    return cu_seqlens is None and num_rows is None and kernel_size % kernel_stride == 0 and num_tokens >= kernel_size


def _compress_chunks(x, weight, pos_emb, kernel_size: int, kernel_stride: int):
    """``compress`` of whole sequences when kernel_stride divides kernel_size, without a gather: window i is the
    ``r = kernel_size // kernel_stride`` chunks i..i+r-1 of kernel_stride tokens, so with ``weight[h]`` cut into r
    row blocks W_j, ``out_i = sum_j chunk_{i+j} @ W_j + flatten(pos_emb) @ weight``: one matmul of the chunks with
    every W_j, then r shifted slices summed. Its backward is matmuls too (the gather's is an index_put)."""
    batch, _, heads, dim = x.shape
    num_rows = num_compressed(x.shape[1], kernel_size, kernel_stride)
    parts = kernel_size // kernel_stride
    num_chunks = num_rows + parts - 1
    chunks = x[:, : num_chunks * kernel_stride].reshape(batch, num_chunks, kernel_stride, heads, dim)
    chunks = chunks.permute(0, 3, 1, 2, 4).flatten(3)  # [B, H, chunks, kernel_stride * D]
    blocks = weight.reshape(heads, parts, kernel_stride * dim, -1).transpose(1, 2).flatten(2)  # [H, s*D, r*Dout]
    products = torch.matmul(chunks, blocks).unflatten(-1, (parts, -1))  # [B, H, chunks, r, Dout]
    out = torch.matmul(pos_emb.reshape(heads, 1, kernel_size * dim), weight)  # [H, 1, Dout]
    for part in range(parts):
        out = out + products[:, :, part : part + num_rows, part]
    return out.transpose(1, 2).contiguous()


def compress_windows(windows, weight, pos_emb):
    """``compress`` of windows already gathered: windows [B, W, kernel_size, H, D] -> [B, W, H, Dout] (no autograd
    workaround: for inference, ``NSACache``)."""
    flat = (windows + pos_emb.transpose(0, 1)).permute(0, 3, 1, 2, 4).flatten(3)  # [B, H, W, ks * D]
    return torch.matmul(flat, weight).transpose(1, 2)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T, H, D] (D even), positions [T] or [B, T] -> [B, T, H, D].

    ``x * cos + rotate_half(x) * sin`` with angles ``position * theta ** (-i / (D/2))`` in float32 (float64 for
    float64 x), rounded once to x's dtype. Plain PyTorch, which Inductor fuses under torch.compile."""
    return rotary_embeddings([x], positions, theta)[0]


def rotary_embeddings(xs, positions: torch.Tensor, theta: float = 10000.0) -> list[torch.Tensor]:
    """``rotary_embedding`` of several tensors at the same positions (a layer's q and k) with one cos/sin table:
    in eager mode the table is a dozen small kernels."""
    compute = torch.float32
    for x in xs:
        compute = torch.promote_types(compute, x.dtype)
    tables = _rotary_tables(positions, xs[0].shape[-1], theta, compute)
    return [_apply_rotary(x, tables) for x in xs]


def _inverse_frequencies(half: int, theta: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[half]: ``theta ** (-i / half)``, the angle per position of each rotated pair."""
    return theta ** (-torch.arange(half, device=device, dtype=dtype) / half)


def _rotary_tables(positions, dim: int, theta: float, dtype: torch.dtype):
    """(cos, signed_sin), each [..., T, 1, D] in ``dtype`` (the compute dtype): ``x * cos + swap_halves(x) *
    signed_sin`` is RoPE for x [..., T, H, D], with ``signed_sin = (-sin, sin)`` so that swapping x's halves is
    rotate_half. Tensors at the same positions (a layer's q and k) share one table."""
    half = dim // 2
    angles = positions.to(dtype).unsqueeze(-1) * _inverse_frequencies(half, theta, dtype, positions.device)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat([cos, cos], dim=-1).unsqueeze(-2), torch.cat([-sin, sin], dim=-1).unsqueeze(-2)


def _apply_rotary(x, tables):
    """x [..., T, H, D] rotated by ``_rotary_tables``, rounded once to x's dtype (the products read x as it is)."""
    cos, signed_sin = tables
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1): one copy, vs neg + cat for (-x2, x1)
    return torch.addcmul(x * cos, swapped, signed_sin).to(x.dtype)
