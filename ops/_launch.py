"""Launching Triton kernels with settings that fit the GPU: tuned settings first, smaller ones on a misfit."""

from __future__ import annotations

import triton

# (kernel, launch config) -> index of the first settings that fit, so a misfit is paid once, not per call/chunk.
_FITTING_SETTINGS: dict[tuple, int] = {}


def launch_fitting(launch, settings_chain, key):
    """Call ``launch(settings)`` with the first settings whose kernel fits the GPU's shared memory."""
    first = _FITTING_SETTINGS.get(key, 0)
    for index in range(first, len(settings_chain) - 1):
        try:
            result = launch(settings_chain[index])
        except triton.runtime.errors.OutOfResources:
            continue
        _FITTING_SETTINGS[key] = index
        return result
    _FITTING_SETTINGS[key] = len(settings_chain) - 1
    return launch(settings_chain[-1])


def fitting_key(kernel_name, q, config):
    return (kernel_name, q.dtype, q.device.index, *sorted(config.items()))
