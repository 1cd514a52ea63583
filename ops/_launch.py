"""Launching the Triton kernels: launch settings that fit the GPU, the shared per-call constants, and the
softmax-backward row term that every attention backward launches first."""

from __future__ import annotations

import contextlib

import torch
import triton
from torch.library import wrap_triton

from . import _settings
from ._kernels.common import softmax_backward_delta_kernel

# (kernel, launch config) -> (its settings chain, index of the first settings that fit), so a misfit is paid once,
# not per call or chunk.
_FITTING_SETTINGS: dict[tuple, tuple[tuple, int]] = {}

# While ``fsa_compile.lowerings`` traces a launcher for Inductor: called as ``check(kernel, grid, args, kwargs)``
# before each launch (a traced launch compiles nothing, so a misfit must be found another way).
_traced_launch_check = None


# Host-side integer helpers in plain Python: in recent triton (3.9 measured) triton.cdiv / triton.next_power_of_2
# are constexpr functions that cost ~2 us per host call, and an op call makes ten or more.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, 1), at least ``minimum``."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def attention_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The constexprs every attention kernel takes from q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]."""
    hq, hkv, d, dv = q.shape[2], k.shape[2], q.shape[-1], v.shape[-1]
    return dict(HQ=hq, HKV=hkv, G=hq // hkv, D=d, DV=dv, BLOCK_D=next_power_of_2(d), BLOCK_DV=next_power_of_2(dv),
                INPUT_PRECISION=_settings.input_precision(q.dtype))


def launcher(kernel, grid):
    """``wrap_triton(kernel)[grid]``: a direct launch in eager mode; while ``fsa_compile.lowerings`` traces the op, a
    traced launch, after the check it installed (``checking_traced_launches``)."""
    launch = wrap_triton(kernel)[grid]
    check = _traced_launch_check
    if check is None:
        return launch

    def checked_launch(*args, **kwargs):
        check(kernel, grid, args, kwargs)
        return launch(*args, **kwargs)

    return checked_launch


@contextlib.contextmanager
def checking_traced_launches(check):
    """Call ``check(kernel, grid, args, kwargs)`` before every ``launcher`` launch inside the block."""
    global _traced_launch_check
    previous, _traced_launch_check = _traced_launch_check, check
    try:
        yield
    finally:
        _traced_launch_check = previous


def launch_fitting(name: str, launch, q: torch.Tensor, config: dict):
    """``launch(settings)`` with the first settings of the chain ``_settings.get(name, q.dtype, G, D)`` whose kernel
    fits the GPU's shared memory. ``launch`` must launch through ``launcher``, so that a misfit also shows while
    torch.compile traces it."""
    chain = _settings.get(name, q.dtype, config.get("G"), config.get("D"))
    key = (name, q.dtype, q.device.index, *sorted(config.items()))
    fitted_chain, first = _FITTING_SETTINGS.get(key, (chain, 0))
    if fitted_chain is not chain:  # overridden since (the cache holds the chain, so `is` cannot be fooled)
        first = 0
    for index in range(first, len(chain)):
        try:
            result = launch(chain[index])
        except triton.runtime.errors.OutOfResources:
            if index == len(chain) - 1:
                raise
            continue
        _FITTING_SETTINGS[key] = (chain, index)
        return result


def softmax_backward_delta(do: torch.Tensor, o: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """float32 [B, Tq, Hq]: ``rowsum(do * o) - dlse``, the per-row term of the attention backward
    (``ds = p * (dp - delta)``); dlse may be None. One Triton pass over do and o."""
    do, o = do.contiguous(), o.contiguous()
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    num_rows, value_dim = delta.numel(), o.shape[-1]
    if num_rows > 0:
        block_rows = 32
        launcher(softmax_backward_delta_kernel, (cdiv(num_rows, block_rows),))(
            do, o, delta if dlse is None else dlse.contiguous(), delta, num_rows, DV=value_dim,
            HAS_DLSE=dlse is not None, BLOCK_R=block_rows, BLOCK_DV=next_power_of_2(value_dim),
        )
    return delta
