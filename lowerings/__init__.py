"""``fsa_compile.lowerings``: how the ``fsa`` ops meet Inductor. ``fsa_compile.ops`` knows nothing about the
compiler; everything that decides what Inductor sees is here.

- ``triton_launches``: under torch.compile a CUDA call is traced through the op's Triton launches, so the
  generated code launches our kernels itself; the rule for when (and the pytorch/pytorch#181735 workaround for
  symbolic sizes), and the check that traced launch settings fit the GPU.
  Where an op stays opaque, its Inductor fallback is registered before Inductor lowers the graph (Inductor's own,
  registered at the op's first node, came too late for the nodes before it in a process's first compile).
- ``compression_windows``: the devices whose compression windows go through an opaque op (an Inductor CPU
  miscompile of the gather's backward).
- ``_compat``: the only imports of private torch APIs.

No ``register_lowering`` yet: Inductor's default handling already fuses the gate sigmoid (with the gate
projection's bias) and the three-way combination into one pointwise kernel per layer, on CPU (C++) and CUDA
(Triton); ``tests/lowerings/test_combine.py`` pins both kernel lists. A lowering belongs here once a fusion into
the sparse kernels' epilogues is attempted.

``register()`` is idempotent and is called once by ``import fsa_compile``, before any compile.
"""

from . import triton_launches

_registered = False


def register() -> None:
    global _registered
    if not _registered:
        triton_launches.register()
        _registered = True


__all__ = ["register"]
