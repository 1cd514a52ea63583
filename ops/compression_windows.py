"""``torch.ops.fsa.compression_windows``: the windows that ``fsa_compile.compress`` maps to compressed keys/values.

``windows[b, h, i] = flatten_j(x[b, tokens[i, j], h] + pos_emb[h, j])`` for ``j < kernel_size``:
x [B, T, H, D], tokens int64 [Tc, kernel_size] (token rows, in ``[0, T)``), pos_emb [H, kernel_size, D]
-> [B, H, Tc, kernel_size * D] in ``promote_types(x.dtype, pos_emb.dtype)``, the head-major layout the
compression matmul reads. Differentiable in x and pos_emb; windows may overlap (their gradients add up).

Why an op and not ``x[:, tokens] + pos_emb`` in plain PyTorch: the backward of that gather is an accumulating
``index_put`` into zeros. Inductor's C++ backend (torch 2.13, CPU) shares that zeros buffer with the zeros of
RoPE's slice backward, turns the index_put into an in-place one on it, and fuses the add of its result into a
kernel that runs *before* the index_put: the compress path's share of dk is silently lost
(``tests/test_compile.py::test_inductor_bug_shared_zeros_index_put``). As an opaque op the scatter runs eagerly
(``index_add_``) on every backend. The cost is one fusion: the gather and the position add are two passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import op_name


def _check_inputs(x, tokens, pos_emb) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 [Tc, kernel_size], got {tokens.dtype} {tuple(tokens.shape)}")
    expected = (x.shape[2], tokens.shape[1], x.shape[3])
    if tuple(pos_emb.shape) != expected:
        raise ValueError(f"pos_emb must be [H, kernel_size, D] = {list(expected)}, got {list(pos_emb.shape)}")


@torch.library.custom_op(op_name("compression_windows"), mutates_args=())
def compression_windows(x: Tensor, tokens: Tensor, pos_emb: Tensor) -> Tensor:
    _check_inputs(x, tokens, pos_emb)
    batch, _, heads, dim = x.shape
    num_windows, kernel_size = tokens.shape
    out_dtype = torch.promote_types(x.dtype, pos_emb.dtype)
    windows = x.transpose(1, 2)[:, :, tokens].to(out_dtype)  # [B, H, Tc, ks, D], a new tensor
    windows += pos_emb.to(out_dtype).unsqueeze(1)
    return windows.view(batch, heads, num_windows, kernel_size * dim)


@compression_windows.register_fake
def _(x, tokens, pos_emb):
    _check_inputs(x, tokens, pos_emb)
    batch, _, heads, dim = x.shape
    num_windows, kernel_size = tokens.shape
    out_dtype = torch.promote_types(x.dtype, pos_emb.dtype)
    return x.new_empty(batch, heads, num_windows, kernel_size * dim, dtype=out_dtype)


@torch.library.custom_op(op_name("compression_windows_backward"), mutates_args=())
def compression_windows_backward(
    grad: Tensor, tokens: Tensor, num_tokens: int, x_dtype: torch.dtype, pos_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """grad [B, H, Tc, kernel_size * D] -> (dx [B, T, H, D] in x_dtype, dpos_emb [H, kernel_size, D] in pos_dtype)."""
    batch, heads, num_windows, flat = grad.shape
    kernel_size = tokens.shape[1]
    dim = flat // kernel_size
    grad = grad.reshape(batch, heads, num_windows, kernel_size, dim)
    dx = grad.new_zeros(batch, heads, num_tokens, dim)
    dx.index_add_(2, tokens.reshape(-1), grad.reshape(batch, heads, num_windows * kernel_size, dim))
    dpos = grad.sum((0, 2))
    return dx.transpose(1, 2).contiguous().to(x_dtype), dpos.to(pos_dtype)


@compression_windows_backward.register_fake
def _(grad, tokens, num_tokens, x_dtype, pos_dtype):
    batch, heads, _, flat = grad.shape
    kernel_size = tokens.shape[1]
    dim = flat // kernel_size
    return (grad.new_empty(batch, num_tokens, heads, dim, dtype=x_dtype),
            grad.new_empty(heads, kernel_size, dim, dtype=pos_dtype))


def _setup_context(ctx, inputs, output):
    x, tokens, pos_emb = inputs
    ctx.save_for_backward(tokens)
    ctx.num_tokens, ctx.x_dtype, ctx.pos_dtype = x.shape[1], x.dtype, pos_emb.dtype


def _backward(ctx, grad):
    (tokens,) = ctx.saved_tensors
    dx, dpos = compression_windows_backward(grad, tokens, ctx.num_tokens, ctx.x_dtype, ctx.pos_dtype)
    return dx, None, dpos


compression_windows.register_autograd(_backward, setup_context=_setup_context)
