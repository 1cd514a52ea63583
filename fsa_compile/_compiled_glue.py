"""The eager layer's plain-PyTorch glue through ``torch.compile``: the setting ``compiled_glue``.

Called eagerly on CUDA, the layer's projection side (q/k/v/gate projections, compression, RoPE) and the gated
combination of the branches are ~60 small kernels forward and ~50 backward whose host time exceeds their GPU time
at 32K tokens. With the setting on, those two functions (``modules._project``, ``functional._combine``: functions of
tensors and ints, so one graph serves every layer of a shape) run through ``torch.compile(fullgraph=True,
dynamic=False)``, compiled on first use per shape. Static shapes: a symbolic T would take the export path (padded
compressed rows, the gather). The layer under ``torch.compile`` or ``torch.export`` traces the plain functions.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from fsa_compile.ops import _settings

# Where the setting applies: CUDA (where the eager glue is host-bound); tests add "cpu" to compare the compiled
# functions with the eager ones in CI.
DEVICES = ("cuda",)


def applies(x: torch.Tensor) -> bool:
    """Whether glue called on ``x`` runs compiled: the setting is on, x is on one of DEVICES, and nothing is being
    compiled, exported or captured in a CUDA graph (a first compile there would launch kernels into the capture;
    a captured graph has no host time to save)."""
    return bool(_settings.get("compiled_glue")) and x.device.type in DEVICES and not (
        torch.compiler.is_compiling() or torch.compiler.is_exporting()
        or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def compiled(function: Callable) -> Callable:
    """``function`` through ``torch.compile(fullgraph=True, dynamic=False)``, built on its first call."""
    build = functools.cache(lambda: torch.compile(function, fullgraph=True, dynamic=False))

    @functools.wraps(function)
    def run(*args, **kwargs):
        return build()(*args, **kwargs)

    return run
