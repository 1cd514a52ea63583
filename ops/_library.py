"""Shared registration helpers for the ``fsa`` operator namespace."""

from __future__ import annotations

import torch

from ._torch_attention import lse_dtype

NAMESPACE = "fsa"


def op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


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
    (``ds = p * (dp - delta)``); dlse may be None."""
    delta = (do.float() * o.float()).sum(-1)
    return delta if dlse is None else delta - dlse.float()


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
