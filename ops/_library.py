"""Shared registration helpers for the ``fsa`` operator namespace."""

from __future__ import annotations

import os

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import wrap_triton

from ._kernels.common import next_power_of_2, softmax_backward_delta_kernel
from ._torch_attention import lse_dtype

NAMESPACE = "fsa"


def op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def triton_custom_op(name: str):
    """Decorator: ``fsa::name`` as a ``custom_op`` whose default implementation launches Triton kernels through
    ``torch.library.wrap_triton``. Add the CPU kernel, the fake and the autograd as for any ``custom_op``.

    This is ``torch.library.triton_op`` limited to CUDA. Under ``torch.compile`` (AOTAutograd's
    FunctionalTensorMode), a call on CUDA tensors is traced through the implementation, so Inductor sees the
    Triton kernels and launches them from the generated code (no Python op dispatch). Everywhere else the op
    stays one opaque node: CPU tensors, ``TRITON_INTERPRET=1``, float64 (the PyTorch path, which reads
    ``cu_seqlens`` on the host), symbolic sizes (``dynamic=True``, see ``_inline_triton``) and ``torch.export``
    (which keeps ``fsa`` nodes, like ``triton_op``).

    ``triton_op`` itself does not fit: it registers the implementation as the fake and inlines it on every
    device, and ``wrap_triton`` cannot trace the interpreter's kernels.
    """

    def register(implementation):
        def eager(*args, **kwargs):
            with set_wrap_triton_enabled(False):  # real tensors: launch directly, skip the HOP (as triton_op)
                return implementation(*args, **kwargs)

        op = torch.library.custom_op(
            op_name(name), eager, mutates_args=(), schema=torch.library.infer_schema(implementation, mutates_args=())
        )

        def trace_kernels(mode, func, types, args, kwargs):
            if any(t not in (torch.Tensor, FakeTensor, FunctionalTensor) for t in types):
                return NotImplemented
            if _inline_triton(args, kwargs):
                with mode:
                    return implementation(*args, **kwargs)
            return mode.__torch_dispatch__(func, types, args, kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, trace_kernels)
        return op

    return register


def _inline_triton(args, kwargs) -> bool:
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    if custom_triton_ops_decomposition_disabled() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    # Symbolic sizes (dynamic=True) stay opaque: Inductor's post-grad decomposition of the traced kernels fails
    # on them with an AssertionError in replace_by_example (pytorch/pytorch#181735; torch 2.11 to 2.13 at least).
    return all(
        x.device.type == "cuda" and x.dtype != torch.float64 and all(isinstance(n, int) for n in x.shape)
        for x in tensors
    )


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def attention_outputs_like(q: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (o [B, Tq, Hq, Dv], lse [B, Tq, Hq]) with the dtypes and strides every kernel returns."""
    batch, num_queries, hq, _ = q.shape
    return q.new_empty(batch, num_queries, hq, value_dim), q.new_empty(batch, num_queries, hq, dtype=lse_dtype(q.dtype))


def attention_grads_like(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty contiguous (dq, dk, dv)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def softmax_backward_delta(do: torch.Tensor, o: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """float32 [B, Tq, Hq]: ``rowsum(do * o) - dlse``, the per-row term of the attention backward
    (``ds = p * (dp - delta)``); dlse may be None. One Triton pass over do and o."""
    do, o = do.contiguous(), o.contiguous()
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    num_rows, value_dim = delta.numel(), o.shape[-1]
    if num_rows > 0:
        block_rows = 32
        wrap_triton(softmax_backward_delta_kernel)[(triton.cdiv(num_rows, block_rows),)](
            do, o, delta if dlse is None else dlse.contiguous(), delta, num_rows, DV=value_dim,
            HAS_DLSE=dlse is not None, BLOCK_R=block_rows, BLOCK_DV=next_power_of_2(value_dim),
        )
    return delta


def register_attention_autograd(forward_op, backward_op) -> None:
    """Autograd for ``forward_op(q, k, v, *rest) -> (o, lse)``.

    ``backward_op(do, dlse, q, k, v, o, lse, *rest) -> (dq, dk, dv)`` is itself a custom op, so the backward
    stays opaque and traceable under torch.compile. ``rest`` (ints, floats, index tensors) is passed through
    unchanged; its tensors travel through ``save_for_backward``.
    """

    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        o, lse = output
        ctx.tensor_slots = [i for i, arg in enumerate(rest) if isinstance(arg, torch.Tensor)]
        ctx.rest = [None if isinstance(arg, torch.Tensor) else arg for arg in rest]
        ctx.save_for_backward(q, k, v, o, lse, *(rest[i] for i in ctx.tensor_slots))
        ctx.set_materialize_grads(False)

    def backward(ctx, do, dlse):
        q, k, v, o, lse, *saved = ctx.saved_tensors
        rest = list(ctx.rest)
        for slot, tensor in zip(ctx.tensor_slots, saved):
            rest[slot] = tensor
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = backward_op(do, dlse, q, k, v, o, lse, *rest)
        return (dq, dk, dv) + (None,) * len(rest)

    forward_op.register_autograd(backward, setup_context=setup_context)
