"""Key/value compression and rotary embeddings in plain PyTorch, so Inductor sees and fuses them (on CPU the
window gather is one opaque op, see ``compression_windows``).

No host synchronisation: packed (``cu_seqlens``) layouts are resolved on the device with ``searchsorted``.
"""

from __future__ import annotations

import torch

from fsa_compile.ops._sequences import compressed_sequences, sequence_bounds, token_sequences
from fsa_compile.ops._validation import num_compressed


def compressed_layout(cu_seqlens, num_tokens: int, kernel_size: int, kernel_stride: int, device, num_rows=None):
    """Where every compressed row comes from.

    -> (first_token [R] long, position [R] long, valid [R] bool) for ``R = num_rows`` rows (default
    ``Tc = max(0, (T - kernel_size) // kernel_stride + 1)``): the first token of the row's window (global
    index), the position within its sequence of the window's last token, and whether the row holds a window
    (packed layouts and rows past Tc are zero).
    """
    if num_rows is None:
        num_rows = num_compressed(num_tokens, kernel_size, kernel_stride)
    rows = torch.arange(num_rows, device=device)
    if cu_seqlens is None:
        first = rows * kernel_stride
        return first, first + kernel_size - 1, first + kernel_size <= num_tokens
    counts, first_rows = compressed_sequences(cu_seqlens, num_tokens, kernel_size, kernel_stride)
    # Boundaries must not be a slice: Inductor's CUDA searchsorted lowering cannot take a SliceView.
    sequence = torch.searchsorted(first_rows + counts, rows, right=True)
    valid = sequence < counts.shape[0]
    sequence = sequence.clamp(max=counts.shape[0] - 1)
    local = (rows - first_rows[sequence]) * kernel_stride
    return sequence_bounds(cu_seqlens, num_tokens)[sequence] + local, local + kernel_size - 1, valid


def token_positions(cu_seqlens, num_tokens: int, device) -> torch.Tensor:
    """Position of every token within its sequence: [T] long."""
    return token_sequences(num_tokens, num_tokens, cu_seqlens, device)[0]


# Devices whose compression windows go through the opaque op (see compression_windows).
OPAQUE_WINDOW_DEVICES = ("cpu",)


def compression_windows(x, tokens, pos_emb):
    """[B, H, Tc, kernel_size * D]: ``flatten_j(x[:, tokens[i, j], h] + pos_emb[h, j])``, tokens [Tc, kernel_size].

    On CPU through the opaque ``torch.ops.fsa.compression_windows``: Inductor's C++ backend miscompiles the
    backward of the plain gather (see ops/compression_windows.py). Elsewhere plain PyTorch, which Inductor fuses
    into one kernel (gather, position add and layout).
    """
    if x.device.type in OPAQUE_WINDOW_DEVICES:
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
    first, _, valid = compressed_layout(cu_seqlens, num_tokens, kernel_size, kernel_stride, x.device, num_rows)
    tokens = (first[:, None] + torch.arange(kernel_size, device=x.device)).clamp(max=max(num_tokens - 1, 0))
    windows = compression_windows(x, tokens, pos_emb)  # [B, H, Tc, ks * D]
    # A broadcast matmul rather than einsum: einsum's internal reshapes add shape guards that break
    # torch.export with a dynamic T.
    out = torch.matmul(windows, weight).transpose(1, 2).contiguous()  # [B, Tc, H, Dout]
    if cu_seqlens is not None or num_rows is not None:
        out = out * valid.view(1, -1, 1, 1).to(out.dtype)
    return out


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T, H, D] (D even), positions [T] or [B, T] -> [B, T, H, D]."""
    half = x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=compute) / half)
    angles = positions.to(compute).unsqueeze(-1) * inv_freq
    cos, sin = torch.cos(angles).unsqueeze(-2), torch.sin(angles).unsqueeze(-2)  # [..., T, 1, half]
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
