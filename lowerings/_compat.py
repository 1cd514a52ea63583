"""The private torch APIs that ``fsa_compile.lowerings`` uses, in one place (checked on torch 2.11 and 2.13)."""

from torch._subclasses.fake_tensor import FakeTensor, is_fake
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from triton.runtime.jit import MockTensor


def export_keeps_custom_triton_ops() -> bool:
    """True while torch.export traces: it keeps ``fsa`` nodes (as ``triton_op`` ops stay one node there)."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return custom_triton_ops_decomposition_disabled()


__all__ = ["FakeTensor", "FunctionalTensor", "FunctionalTensorMode", "MockTensor", "export_keeps_custom_triton_ops",
           "is_fake"]
