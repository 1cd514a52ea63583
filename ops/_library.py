"""The ``fsa`` operator namespace and the one way an op is registered in it (``define_op``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch._library.triton import set_wrap_triton_enabled

from . import _eager_graphs
from ._torch_attention import lse_dtype

NAMESPACE = "fsa"

# name -> the op's Triton implementation with its checks, for fsa_compile.lowerings, which may trace it.
_TRITON_IMPLEMENTATIONS: dict[str, Callable] = {}
# name -> op: every op of the namespace, for fsa_compile.lowerings (``define_op`` and ``listed`` add them).
_OPS: dict[str, torch.library.CustomOpDef] = {}


def op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def define_op(name: str, schema: str, *, torch_impl: Callable, fake: Callable, triton_impl: Callable | None = None,
              check: Callable | None = None, eager_graphs: bool = True) -> torch.library.CustomOpDef:
    """Register ``fsa::name`` with ``schema``; every function takes the schema's arguments.

    - CPU: ``torch_impl`` (vectorised PyTorch).
    - Every other device: ``triton_impl`` (Triton kernels), or ``torch_impl`` for float64 inputs and when there is
      no ``triton_impl``; on CUDA replayed from a CUDA graph of the call where ``_eager_graphs`` allows. CPU
      tensors take this path too under ``TRITON_INTERPRET=1`` once the CPU kernel is switched off
      (``op.set_kernel_enabled("cpu", False)``).
    - Fake tensors: ``fake`` (metadata only).

    ``eager_graphs=False``: never replay the Triton path from a CUDA graph (an op of one launch gains nothing from it
    but the copies). ``check`` runs once per call on each of these paths, before the implementation. Ops with a
    Triton implementation are listed for ``fsa_compile.lowerings``. Attention ops with a backward op:
    ``define_attention_op``.
    """

    arguments = [(a.name, a.default_value if a.has_default_value() else None)
                 for a in torch._C.parse_schema(f"{op_name(name)}{schema}").arguments]

    def checked(implementation, graphed=False):
        def run(*args, **kwargs):
            # The dispatcher passes what the caller passed: complete the defaults, so that every function can take
            # the schema's arguments positionally.
            if len(args) < len(arguments):
                args = (*args, *(kwargs.get(arg, default) for arg, default in arguments[len(args):]))
            if check is not None:
                check(*args)
            if graphed:
                return _eager_graphs.run(name, implementation, args)
            return implementation(*args)

        return run

    torch_path, triton_path = checked(torch_impl), checked(triton_impl) if triton_impl else None
    graphed_triton_path = checked(triton_impl, graphed=eager_graphs) if triton_impl else None

    def device_path(*args, **kwargs):
        if triton_path is None or args[0].dtype == torch.float64:
            return torch_path(*args, **kwargs)
        with set_wrap_triton_enabled(False):  # real tensors: launch directly, skip the HOP (as triton_op does)
            return graphed_triton_path(*args, **kwargs)

    op = torch.library.custom_op(op_name(name), device_path, mutates_args=(), schema=schema)
    op.register_kernel("cpu")(torch_path)
    op.register_fake(checked(fake))
    if triton_path is not None:
        _TRITON_IMPLEMENTATIONS[name] = triton_path
    return listed(op)


def listed(op: torch.library.CustomOpDef) -> torch.library.CustomOpDef:
    """``op``, entered in the namespace's registry (``all_ops``, read by ``fsa_compile.lowerings``): ``define_op``
    enters its ops; an op defined without it (a device-only internal op) is passed here."""
    _OPS[op._name] = op
    return op


def all_ops() -> dict[str, torch.library.CustomOpDef]:
    """``{name: op}`` of every op in the namespace."""
    return dict(_OPS)


def triton_implementations() -> dict[str, Callable]:
    """``{name: implementation}`` of every op with a Triton implementation (checks included)."""
    return dict(_TRITON_IMPLEMENTATIONS)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def attention_outputs_like(q: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (o [B, Tq, Hq, Dv], lse [B, Tq, Hq]) with the dtypes and strides every kernel returns."""
    batch, num_queries, hq, _ = q.shape
    return q.new_empty(batch, num_queries, hq, value_dim), q.new_empty(batch, num_queries, hq, dtype=lse_dtype(q.dtype))


def attention_grads_like(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty contiguous (dq, dk, dv)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def define_attention_op(name: str, schema: str, *, check: Callable, torch_forward: Callable,
                        triton_forward: Callable, torch_backward: Callable, triton_backward: Callable):
    """``fsa::name(q, k, v, *rest) -> (o, lse)`` and ``fsa::name_backward(do, dlse, q, k, v, o, lse, *rest) ->
    (dq, dk, dv)`` (its schema derived from ``schema``), with their fakes and autograd. -> (op, backward op)."""
    arguments, _ = schema[1:].split(") -> ")
    arguments = arguments.split(", ")
    backward_schema = (f"(Tensor do, Tensor? dlse, {', '.join(arguments[:3])}, Tensor o, Tensor lse, "
                       f"{', '.join(arguments[3:])}) -> (Tensor, Tensor, Tensor)")
    forward_op = define_op(name, schema, check=check, torch_impl=torch_forward, triton_impl=triton_forward,
                           fake=lambda q, k, v, *_: attention_outputs_like(q, v.shape[-1]))
    backward_op = define_op(f"{name}_backward", backward_schema, torch_impl=torch_backward, triton_impl=triton_backward,
                            fake=lambda do, dlse, q, k, v, *_: attention_grads_like(q, k, v))
    register_attention_autograd(forward_op, backward_op)
    return forward_op, backward_op


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
