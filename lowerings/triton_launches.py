"""Let Inductor see the Triton kernels of the ``fsa`` ops: under torch.compile, a call on CUDA tensors is traced
through the op's Triton implementation, so the generated code launches our kernels itself (no Python op
dispatch), like ``torch.library.triton_op``.

Everywhere else the op stays one opaque node: CPU tensors, ``TRITON_INTERPRET=1`` (``wrap_triton`` cannot trace
the interpreter's kernels), float64 (the PyTorch path, which reads ``cu_seqlens`` on the host), symbolic sizes
(below) and ``torch.export`` (which keeps ``fsa`` nodes, like ``triton_op``). ``triton_op`` itself does not fit:
it registers the implementation as the fake and inlines it on every device.

Workaround: symbolic sizes (``dynamic=True``) stay opaque because Inductor's post-grad decomposition of the traced
kernels fails on them with an AssertionError in ``replace_by_example`` (pytorch/pytorch#181735; torch 2.11 to 2.13
at least).
"""

from __future__ import annotations

import os

import torch

from fsa_compile.ops import _launch, _library

from ._compat import (
    FakeTensor, FunctionalTensor, FunctionalTensorMode, MockTensor, export_keeps_custom_triton_ops, is_fake,
    register_inductor_fallback,
)


def traces_triton(args) -> bool:
    """Whether a call with these arguments is traced through its Triton implementation (see the module docstring)."""
    if export_keeps_custom_triton_ops() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    tensors = [x for x in args if isinstance(x, torch.Tensor)]
    return all(
        x.device.type == "cuda" and x.dtype != torch.float64 and all(isinstance(n, int) for n in x.shape)
        for x in tensors
    )


def check_kernel_fits(kernel, grid, args, kwargs) -> None:
    """Raise ``OutOfResources`` for a misfit while tracing, as a real launch would.

    A traced launch compiles nothing, so Inductor would get settings that fail at run time (fp32 or large head
    dims), and ``_launch.launch_fitting`` could not fall back to smaller ones. So the kernel is compiled and loaded
    for the device on stand-in pointers of the same dtypes: shared memory depends on the dtypes and constexprs only.
    """
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    if not (tensors and tensors[0].is_cuda and any(is_fake(x) for x in tensors)):
        return
    stand_in = lambda x: MockTensor(x.dtype) if isinstance(x, torch.Tensor) else x  # noqa: E731
    with torch.cuda.device(tensors[0].device):
        compiled = kernel.warmup(*map(stand_in, args), grid=grid, **{name: stand_in(x) for name, x in kwargs.items()})
        compiled._init_handles()


def _trace_rule(implementation=None):
    """The FunctionalTensorMode rule of an fsa op: traced through ``implementation`` where ``traces_triton``, else
    one opaque node, whose Inductor fallback is registered before Inductor lowers the graph."""
    def trace(mode, func, types, args, kwargs):
        if any(t not in (torch.Tensor, FakeTensor, FunctionalTensor) for t in types):
            return NotImplemented
        if implementation is not None and traces_triton((*args, *kwargs.values())):
            with mode, _launch.checking_traced_launches(check_kernel_fits):
                return implementation(*args, **kwargs)
        register_inductor_fallback(func)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    return trace


def register() -> None:
    """Give every ``fsa`` op its rule under AOTAutograd's FunctionalTensorMode (``_trace_rule``)."""
    implementations = _library.triton_implementations()
    for name, op in _library.all_ops().items():
        op.register_torch_dispatch(FunctionalTensorMode, _trace_rule(implementations.get(name)))
