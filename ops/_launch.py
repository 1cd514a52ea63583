"""Launching Triton kernels with settings that fit the GPU: tuned settings first, smaller ones on a misfit."""

from __future__ import annotations

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.jit import MockTensor

# (kernel, launch config) -> index of the first settings that fit, so a misfit is paid once, not per call/chunk.
_FITTING_SETTINGS: dict[tuple, int] = {}


def launch_fitting(launch, settings_chain, key):
    """Call ``launch(settings)`` with the first settings whose kernel fits the GPU's shared memory.

    ``launch`` must launch through ``fitted_kernel``, so that a misfit also shows while torch.compile traces it.
    """
    first = _FITTING_SETTINGS.get(key, 0)
    for index in range(first, len(settings_chain)):
        try:
            result = launch(settings_chain[index])
        except triton.runtime.errors.OutOfResources:
            if index == len(settings_chain) - 1:
                raise
            continue
        _FITTING_SETTINGS[key] = index
        return result


def fitting_key(kernel_name, q, config):
    return (kernel_name, q.dtype, q.device.index, *sorted(config.items()))


def fitted_kernel(kernel, grid):
    """``wrap_triton(kernel)[grid]`` that raises ``OutOfResources`` for a misfit even while torch.compile traces it.

    A traced launch compiles nothing, so Inductor would get settings that fail at run time (fp32 or large head
    dims). On fake tensors the kernel is therefore first compiled and loaded for the device, on stand-in
    pointers of the same dtypes: shared memory depends on the dtypes and constexprs only.
    """
    launch = wrap_triton(kernel)[grid]

    def checked_launch(*args, **kwargs):
        tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        if tensors and tensors[0].is_cuda and any(is_fake(x) for x in tensors):
            stand_in = lambda x: MockTensor(x.dtype) if isinstance(x, torch.Tensor) else x  # noqa: E731
            with torch.cuda.device(tensors[0].device):
                compiled = kernel.warmup(
                    *map(stand_in, args), grid=grid, **{name: stand_in(x) for name, x in kwargs.items()}
                )
                compiled._init_handles()  # raises OutOfResources as a real launch would
        return launch(*args, **kwargs)

    return checked_launch
