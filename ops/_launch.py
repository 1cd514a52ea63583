"""Launching Triton kernels with settings that fit the GPU: tuned settings first, smaller ones on a misfit."""

from __future__ import annotations

import triton

# (kernel, launch config) -> index of the first settings that fit, so a misfit is paid once, not per call/chunk.
_FITTING_SETTINGS: dict[tuple, int] = {}


def launch_fitting(launch, settings_chain, key):
    """Call ``launch(settings)`` with the first settings whose kernel fits the GPU's shared memory.

    While torch.compile traces a launch (``wrap_triton``; static shapes only) nothing is compiled, so no
    misfit shows: the traced graph gets the settings that fitted in eager, else the first ones.
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
