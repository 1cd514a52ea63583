"""Compressed attention as a dense causal attention over regrouped queries: cuDNN's fast path on CUDA.

Query t sees compressed keys ``0..s`` with ``s = (t - kernel_size + 1) // kernel_stride``, so the kernel_stride
consecutive queries that share s form one query row of a plain square causal attention over the Tc compressed
keys. The regrouping drops the first ``kernel_size - 1`` queries (they see nothing: o = 0, lse = -inf), pads the
rest to ``Tc * kernel_stride`` and moves each row's kernel_stride queries into the head dimension:

    q [B, T, Hq, D] -> [B, Hq * kernel_stride, Tc, D]     (head h * kernel_stride + r: query Tc-row s, offset r)

which is GQA with groups of ``G * kernel_stride`` heads over ``k_cmp`` / ``v_cmp`` as they are. The outputs go
back the same way (``_ungroup``). Exact: the same attention as the masked kernel, in another layout.

Used on CUDA for whole equal-length sequences (no ``cu_seqlens``, ``seqlens_k``, queries = keys), 16-bit inputs
and head dims cuDNN takes, for the groups and lengths in ``_settings`` (``compressed_dense``: measured, see
there); everything else runs the Triton masked kernel. Forward and backward choose independently (both give
the same lse); a backward with a gradient for lse (``dlse``) runs the Triton kernel, which takes it, and so does
one under ``torch.use_deterministic_algorithms(True)`` (cuDNN's backward sums dq in a run-dependent order).

Under torch.compile the dense path is one opaque op each way (``fsa::_compressed_dense_forward`` /
``_backward``): the regrouping copies run inside it, out of Inductor's sight. Traced into the graph instead, the
regrouping of 256 heads (G = 4) made Inductor 2.11's tiling analysis crash (``CantSplit.__init__() missing 2
required positional arguments``, fixed in later releases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _eager_graphs, _settings
from ._layout import num_compressed
from ._library import attention_grads_like, attention_outputs_like, listed, op_name


def applies(q, k_cmp, v_cmp, kernel_size: int, kernel_stride: int, cu_seqlens, seqlen_k, cu_seqlens_k,
            seqlens_k) -> bool:
    """Whether this call takes the dense path (shapes and settings only: no sync)."""
    num_tokens = q.shape[1]
    if (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or cu_seqlens is not None
            or cu_seqlens_k is not None or seqlens_k is not None or (seqlen_k is not None and seqlen_k != num_tokens)
            or not isinstance(num_tokens, int)):
        return False
    head_dim, group = q.shape[-1], q.shape[2] // k_cmp.shape[2]
    if v_cmp.shape[-1] != head_dim or head_dim % 8 != 0 or head_dim > 128:
        return False
    lengths = _settings.get("compressed_dense", q.dtype, group, head_dim)
    return (lengths is not None and num_tokens >= kernel_size
            and (group <= lengths["max_group"] or num_tokens >= lengths["min_tokens"]))


def _regroup(x, kernel_size: int, kernel_stride: int, num_rows: int):
    """[B, T, H, E] -> [B, H * kernel_stride, num_rows, E], queries ``kernel_size - 1`` on, zero padded: one copy
    into memory ordered [B, num_rows, H, kernel_stride, E] (the strides cuDNN takes as they are)."""
    batch, _, heads, width = x.shape
    rows = x[:, kernel_size - 1:]
    full = rows.shape[1] // kernel_stride  # rows filled by queries; at most one more, partly filled
    grouped = x.new_empty(batch, num_rows, heads, kernel_stride, width)
    grouped[:, :full].copy_(rows[:, : full * kernel_stride].unflatten(1, (full, kernel_stride)).transpose(2, 3))
    if full < num_rows:
        tail = rows.shape[1] - full * kernel_stride
        grouped[:, full, :, :tail].copy_(rows[:, full * kernel_stride:].transpose(1, 2))
        grouped[:, full, :, tail:].zero_()
    return grouped.view(batch, num_rows, heads * kernel_stride, width).transpose(1, 2)


def _ungroup(y, num_tokens: int, kernel_size: int, kernel_stride: int, fill: float):
    """The inverse of ``_regroup``: [B, H * kernel_stride, Tc, E] -> [B, T, H, E], ``fill`` before kernel_size - 1;
    one copy."""
    batch, _, _, width = y.shape
    heads = y.shape[1] // kernel_stride
    grouped = y.transpose(1, 2).unflatten(2, (heads, kernel_stride)).transpose(2, 3)  # [B, Tc, stride, H, E]
    out = y.new_empty(batch, num_tokens, heads, width)
    out[:, : kernel_size - 1] = fill
    rows = out[:, kernel_size - 1:]
    full = rows.shape[1] // kernel_stride
    rows[:, : full * kernel_stride].view(batch, full, kernel_stride, heads, width).copy_(grouped[:, :full])
    if full * kernel_stride < rows.shape[1]:
        rows[:, full * kernel_stride:].copy_(grouped[:, full, : rows.shape[1] - full * kernel_stride])
    return out


def _cudnn_forward(q, k, v, scale):
    """Causal attention, q [B, Hq, S, D], k, v [B, Hkv, S, D] -> o [B, Hq, S, D], lse [B, Hq, S, 1] float32."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return out[0], out[1]


def _cudnn_backward(do, q, k, v, o, lse, scale):
    num_rows = q.shape[2]
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # seed and offset, unread without dropout
    # No bias, no cumulative sequence lengths: undefined tensors (None), as PyTorch's own SDPA backward passes them.
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, o, lse, no_dropout, no_dropout, None, None, None, num_rows, num_rows, 0.0, True, scale=scale
    )


def forward(q, k_cmp, v_cmp, kernel_size: int, kernel_stride: int, scale: float, attention=_cudnn_forward):
    """-> o [B, T, Hq, D], lse [B, T, Hq] float32, as the op. ``attention``: the dense causal attention (tests pass
    a plain PyTorch one)."""
    num_tokens = q.shape[1]
    num_rows = num_compressed(num_tokens, kernel_size, kernel_stride)
    keys, values = k_cmp[:, :num_rows].transpose(1, 2), v_cmp[:, :num_rows].transpose(1, 2)
    o, lse = attention(_regroup(q, kernel_size, kernel_stride, num_rows), keys, values, scale)
    return (_ungroup(o, num_tokens, kernel_size, kernel_stride, 0.0),
            _ungroup(lse.view(*lse.shape[:3], 1), num_tokens, kernel_size, kernel_stride, float("-inf")).squeeze(-1))


def backward(do, q, k_cmp, v_cmp, o, lse, kernel_size: int, kernel_stride: int, scale: float,
             attention_backward=_cudnn_backward):
    """-> dq, dk_cmp, dv_cmp of ``forward`` (no lse gradient); rows of k_cmp past Tc get zero gradients."""
    num_tokens, num_stored = q.shape[1], k_cmp.shape[1]
    num_rows = num_compressed(num_tokens, kernel_size, kernel_stride)
    keys, values = k_cmp[:, :num_rows].transpose(1, 2), v_cmp[:, :num_rows].transpose(1, 2)
    grouped = [_regroup(x, kernel_size, kernel_stride, num_rows) for x in (do, q, o, lse.unsqueeze(-1))]
    grouped[3] = grouped[3].contiguous()  # padding rows get lse 0: finite, so p = exp(0) there times do = 0
    dq, dk, dv = attention_backward(grouped[0], grouped[1], keys, values, grouped[2], grouped[3], scale)
    pad = (0, 0, 0, 0, 0, num_stored - num_rows)
    return (_ungroup(dq, num_tokens, kernel_size, kernel_stride, 0.0),
            F.pad(dk.transpose(1, 2), pad).contiguous(), F.pad(dv.transpose(1, 2), pad).contiguous())


# ---- the opaque ops the CUDA path calls ---------------------------------------------------------------------

@torch.library.custom_op(
    op_name("_compressed_dense_forward"), mutates_args=(), device_types="cuda",
    schema="(Tensor q, Tensor k_cmp, Tensor v_cmp, int kernel_size, int kernel_stride, float scale) "
           "-> (Tensor, Tensor)",
)
def forward_op(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale):
    """``forward`` on cuDNN (replayed from a CUDA graph where host-bound, as the fsa ops: also when compiled code
    calls it)."""
    return _eager_graphs.run("_compressed_dense_forward", forward, (q, k_cmp, v_cmp, kernel_size, kernel_stride, scale))


@torch.library.custom_op(
    op_name("_compressed_dense_backward"), mutates_args=(), device_types="cuda",
    schema="(Tensor do, Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor o, Tensor lse, int kernel_size, "
           "int kernel_stride, float scale) -> (Tensor, Tensor, Tensor)",
)
def backward_op(do, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale):
    """``backward`` on cuDNN (replayed from a CUDA graph where host-bound)."""
    return _eager_graphs.run("_compressed_dense_backward", backward,
                             (do, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale))


listed(forward_op).register_fake(lambda q, k_cmp, v_cmp, *_: attention_outputs_like(q, v_cmp.shape[-1]))
listed(backward_op).register_fake(lambda do, q, k_cmp, v_cmp, *_: attention_grads_like(q, k_cmp, v_cmp))
