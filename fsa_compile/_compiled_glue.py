"""The eager layer's plain-PyTorch glue through ``torch.compile``: the setting ``compiled_glue`` (on by default;
``fsa_compile.set_compiled_glue(False)`` turns it off).

Called eagerly on CUDA, the layer's projection side (q/k/v/gate projections, compression, RoPE) and the gated
combination of the branches are ~60 small kernels forward and ~50 backward whose host time exceeds their GPU time
at 32K tokens. With the setting on, those two functions (``modules._project``, ``functional._combine``: functions of
tensors and ints, so one graph serves every layer of a shape) run through ``torch.compile(fullgraph=True,
dynamic=False)``, compiled on first use per shape. Static shapes: a symbolic T would take the export path (padded
compressed rows, the gather). Each function compiles for at most MAX_SIGNATURES distinct input signatures (shapes,
dtypes, grad mode); calls with a further one run eagerly, since Dynamo fails a ``fullgraph`` function past its
recompile limit (8 graphs). The layer under ``torch.compile`` or ``torch.export`` traces the plain functions.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from fsa_compile.ops import _settings

# Where the setting applies: CUDA (where the eager glue is host-bound); tests add "cpu" to compare the compiled
# functions with the eager ones in CI.
DEVICES = ("cuda",)
# Input signatures compiled per function, well under Dynamo's recompile limit (8), which also counts guards that
# the signature does not model.
MAX_SIGNATURES = 4


def applies(x: torch.Tensor) -> bool:
    """Whether glue called on ``x`` runs compiled: the setting is on, x is on one of DEVICES, and nothing is being
    compiled, exported or captured in a CUDA graph (a first compile there would launch kernels into the capture;
    a captured graph has no host time to save)."""
    return bool(_settings.get("compiled_glue")) and x.device.type in DEVICES and not (
        torch.compiler.is_compiling() or torch.compiler.is_exporting()
        or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def set_compiled_glue(enabled: bool) -> None:
    """Whether the layer called eagerly on CUDA runs its projections, compression, RoPE and gated combination through
    ``torch.compile`` (default: True). Each of the two functions compiles on its first call with a new input
    signature (shapes, dtypes, grad mode), for up to four signatures, and runs eagerly for further ones; a compile
    takes seconds. Off, the glue is ~100 small eager kernels per step, host-bound below ~64K tokens."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    _settings.replace("compiled_glue", enabled)


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a static-shape graph is specialised on: each tensor's shape, strides, dtype, device and requires_grad, the
    other arguments' values, the grad, inference and autocast modes."""
    def describe(a):
        if isinstance(a, torch.Tensor):
            return tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad
        return a
    return (tuple(map(describe, args)), tuple((k, describe(v)) for k, v in kwargs.items()), torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"), torch.is_autocast_enabled("cpu"))


def compiled(function: Callable) -> Callable:
    """``function`` through ``torch.compile(fullgraph=True, dynamic=False)``, built on its first call, for its first
    MAX_SIGNATURES input signatures; eager for the others."""
    build = functools.cache(lambda: torch.compile(function, fullgraph=True, dynamic=False))
    signatures = set()

    @functools.wraps(function)
    def run(*args, **kwargs):
        signature = _signature(args, kwargs)
        if signature not in signatures:
            if len(signatures) >= min(MAX_SIGNATURES, torch._dynamo.config.recompile_limit):
                return function(*args, **kwargs)
            signatures.add(signature)
        return build()(*args, **kwargs)

    return run
