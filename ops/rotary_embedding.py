"""``torch.ops.fsa.rotary_embedding``: rotate-half RoPE of the layer's q, k and compressed keys.

x [B, T, H, D] (D even), positions int [T] or [B, T] -> [B, T, H, D] in x's dtype (contiguous):
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)`` and angles ``position * theta ** (-i / (D/2))``
computed in float32 (float64 for float64 x) and rounded once. ``inverse=True`` rotates by the negative angles,
which is the backward (RoPE is a rotation); differentiable in x.

Kernels: PyTorch on CPU and for float64 (``rotary_tables`` and ``apply_rotary``, which the layer also uses under
torch.compile, where Inductor fuses them with their neighbours); on CUDA one Triton pass
(``_kernels/rotary_embedding.py``) instead of the ~10 eager PyTorch kernels per direction. The layer calls this op in
eager mode on CUDA only when the setting ``fused_rope`` is on (off by default: not yet run on a GPU).
"""

from __future__ import annotations

import torch

from . import _validation as check
from ._kernels.rotary_embedding import _rotary_embedding_kernel
from ._launch import cdiv, launcher, next_power_of_2
from ._library import define_op

SCHEMA = "(Tensor x, Tensor positions, float theta=10000.0, bool inverse=False) -> Tensor"


def _check_inputs(x, positions, theta, inverse) -> None:
    check.check_tensor("x", x, 4, "[B, T, H, D]")
    check.check_float("x", x)
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"x's head dim D=x.shape[3] must be even (RoPE rotates pairs), got {x.shape[-1]}")
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise TypeError(f"positions must be an int32 or int64 tensor, got {got}")
    batch, num_tokens = x.shape[:2]
    if tuple(positions.shape) not in ((num_tokens,), (batch, num_tokens)):
        raise ValueError(f"positions must be [T]=[{num_tokens}] or [B, T]=[{batch}, {num_tokens}], got shape "
                         f"{tuple(positions.shape)}")
    check.check_device("positions", positions, x)
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")


def inverse_frequencies(half: int, theta: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[half]: ``theta ** (-i / half)``, the angle per position of each rotated pair."""
    return theta ** (-torch.arange(half, device=device, dtype=dtype) / half)


# ---- CPU path (and the layer's path under torch.compile) -----------------------------------------------------

def rotary_tables(positions, dim: int, theta: float, dtype: torch.dtype, inverse: bool = False):
    """(cos, signed_sin), each [..., T, 1, D] in ``dtype`` (the compute dtype): ``x * cos + swap_halves(x) *
    signed_sin`` is the op for x [..., T, H, D], with ``signed_sin = (-sin, sin)`` so that swapping x's halves is
    rotate_half. Tensors at the same positions (a layer's q and k) share one table."""
    half = dim // 2
    angles = positions.to(dtype).unsqueeze(-1) * inverse_frequencies(half, theta, dtype, positions.device)
    cos, sin = torch.cos(angles), torch.sin(angles)
    if inverse:
        sin = -sin
    return torch.cat([cos, cos], dim=-1).unsqueeze(-2), torch.cat([-sin, sin], dim=-1).unsqueeze(-2)


def apply_rotary(x, tables):
    """x [..., T, H, D] rotated by ``rotary_tables``, rounded once to x's dtype (the products read x as it is)."""
    cos, signed_sin = tables
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1): one copy, vs neg + cat for (-x2, x1)
    return torch.addcmul(x * cos, swapped, signed_sin).to(x.dtype)


def rotary_embedding_torch(x, positions, theta: float = 10000.0, inverse: bool = False):
    """The op in PyTorch: a few passes over x in eager mode."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return apply_rotary(x, rotary_tables(positions, x.shape[-1], theta, compute, inverse))


# ---- CUDA path ---------------------------------------------------------------------------------------------

def _rotary_embedding_triton(x, positions, theta, inverse):
    batch, num_tokens, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    half = dim // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = batch * num_tokens * heads
    if num_rows > 0:
        block_rows = 32
        launcher(_rotary_embedding_kernel, (cdiv(num_rows, block_rows),))(
            x, positions.contiguous(), inverse_frequencies(half, theta, torch.float32, x.device), out, num_rows,
            num_tokens, heads, x.stride(0), x.stride(1), x.stride(2), POSITIONS_PER_BATCH=positions.dim() == 2,
            INVERSE=bool(inverse), HALF=half, BLOCK_R=block_rows, BLOCK_HALF=next_power_of_2(half),
        )
    return out


# ---- registration ------------------------------------------------------------------------------------------

rotary_embedding = define_op(
    "rotary_embedding", SCHEMA, check=_check_inputs, torch_impl=rotary_embedding_torch,
    triton_impl=_rotary_embedding_triton, fake=lambda x, *_: torch.empty(x.shape, dtype=x.dtype, device=x.device),
    eager_graphs=False,  # one launch: a replay would add two copies and save no host time
)


def _setup_context(ctx, inputs, output):
    _, positions, theta, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.theta, ctx.inverse = theta, inverse


def _backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return rotary_embedding(grad, positions, ctx.theta, not ctx.inverse), None, None, None


rotary_embedding.register_autograd(_backward, setup_context=_setup_context)
