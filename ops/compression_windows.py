"""``torch.ops.fsa.compression_windows``: the windows that ``fsa_compile.compress`` maps to compressed keys/values.

``windows[b, h, i] = flatten_j(x[b, tokens[i, j], h] + pos_emb[h, j])`` for ``j < kernel_size``:
x [B, T, H, D], tokens int64 [Tc, kernel_size] (token rows, in ``[0, T)``), pos_emb [H, kernel_size, D]
-> [B, H, Tc, kernel_size * D] in ``promote_types(x.dtype, pos_emb.dtype)``, the head-major layout the
compression matmul reads. Differentiable in x and pos_emb; windows may overlap (their gradients add up).

An op rather than ``x[:, tokens] + pos_emb`` in plain PyTorch on CPU, where its backward (an eager
``index_add_``) sidesteps an Inductor miscompile of the gather's backward: see
``fsa_compile/lowerings/compression_windows.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import define_op


def _check_inputs(x, tokens, pos_emb) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 [Tc, kernel_size], got {tokens.dtype} {tuple(tokens.shape)}")
    expected = (x.shape[2], tokens.shape[1], x.shape[3])
    if tuple(pos_emb.shape) != expected:
        raise ValueError(f"pos_emb must be [H, kernel_size, D] = {list(expected)}, got {list(pos_emb.shape)}")


def _windows(x: Tensor, tokens: Tensor, pos_emb: Tensor) -> Tensor:
    batch, _, heads, dim = x.shape
    num_windows, kernel_size = tokens.shape
    out_dtype = torch.promote_types(x.dtype, pos_emb.dtype)
    windows = x.transpose(1, 2)[:, :, tokens].to(out_dtype)  # [B, H, Tc, ks, D], a new tensor
    windows += pos_emb.to(out_dtype).unsqueeze(1)
    return windows.view(batch, heads, num_windows, kernel_size * dim)


def _windows_fake(x, tokens, pos_emb):
    batch, _, heads, dim = x.shape
    num_windows, kernel_size = tokens.shape
    out_dtype = torch.promote_types(x.dtype, pos_emb.dtype)
    return x.new_empty(batch, heads, num_windows, kernel_size * dim, dtype=out_dtype)


def _windows_backward(grad, tokens, num_tokens, x_dtype, pos_dtype):
    """grad [B, H, Tc, kernel_size * D] -> (dx [B, T, H, D] in x_dtype, dpos_emb [H, kernel_size, D] in pos_dtype)."""
    batch, heads, num_windows, flat = grad.shape
    kernel_size = tokens.shape[1]
    dim = flat // kernel_size
    grad = grad.reshape(batch, heads, num_windows, kernel_size, dim)
    dx = grad.new_zeros(batch, heads, num_tokens, dim)
    dx.index_add_(2, tokens.reshape(-1), grad.reshape(batch, heads, num_windows * kernel_size, dim))
    dpos = grad.sum((0, 2))
    return dx.transpose(1, 2).contiguous().to(x_dtype), dpos.to(pos_dtype)


def _windows_backward_fake(grad, tokens, num_tokens, x_dtype, pos_dtype):
    batch, heads, _, flat = grad.shape
    kernel_size = tokens.shape[1]
    dim = flat // kernel_size
    return (grad.new_empty(batch, num_tokens, heads, dim, dtype=x_dtype),
            grad.new_empty(heads, kernel_size, dim, dtype=pos_dtype))


compression_windows = define_op(
    "compression_windows", "(Tensor x, Tensor tokens, Tensor pos_emb) -> Tensor", check=_check_inputs,
    torch_impl=_windows, fake=_windows_fake,
)
compression_windows_backward = define_op(
    "compression_windows_backward",
    "(Tensor grad, Tensor tokens, SymInt num_tokens, ScalarType x_dtype, ScalarType pos_dtype) -> (Tensor, Tensor)",
    torch_impl=_windows_backward, fake=_windows_backward_fake,
)


def _setup_context(ctx, inputs, output):
    x, tokens, pos_emb = inputs
    ctx.save_for_backward(tokens)
    ctx.num_tokens, ctx.x_dtype, ctx.pos_dtype = x.shape[1], x.dtype, pos_emb.dtype


def _backward(ctx, grad):
    (tokens,) = ctx.saved_tensors
    dx, dpos = compression_windows_backward(grad, tokens, ctx.num_tokens, ctx.x_dtype, ctx.pos_dtype)
    return dx, None, dpos


compression_windows.register_autograd(_backward, setup_context=_setup_context)
