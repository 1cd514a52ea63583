"""The private torch APIs that ``fsa_compile.lowerings`` uses, in one place (checked on torch 2.11 and 2.13;
``register_inductor_fallback`` on 2.13 only: it does nothing where its APIs are missing)."""

import sys

import torch
from torch._subclasses.fake_tensor import FakeTensor, is_fake
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from triton.runtime.jit import MockTensor


def export_keeps_custom_triton_ops() -> bool:
    """True while torch.export traces: it keeps ``fsa`` nodes (as ``triton_op`` ops stay one node there)."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return custom_triton_ops_decomposition_disabled()


def register_inductor_fallback(op: torch._ops.OpOverload) -> None:
    """Register the implicit fallback that Inductor would create for ``op`` when lowering its first node (with the
    op's layout constraint), now, if Inductor is loaded and ``op`` has no lowering yet.

    Inductor registers it only while lowering the op's first node, after the nodes before it; those then do not
    see the op among the users that need realized inputs, and an output read by several fsa ops (the rotated q) is
    recomputed into one buffer per op instead of stored once: the first compile in a process differs from the
    later ones. Called while AOTAutograd traces, before Inductor lowers."""
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None or op in lowering.lowerings:
        return
    try:
        from torch._library.utils import get_layout_constraint_tag

        constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        lowering.make_fallback(op, layout_constraint=constraint)
    except (ImportError, AttributeError, TypeError):
        pass  # a torch without these: Inductor registers the fallback itself, as before


__all__ = ["FakeTensor", "FunctionalTensor", "FunctionalTensorMode", "MockTensor", "export_keeps_custom_triton_ops",
           "is_fake", "register_inductor_fallback"]
