"""Where ``fsa_compile.compress`` gathers its windows through the opaque ``torch.ops.fsa.compression_windows``.

Workaround for an Inductor bug of the C++ (CPU) backend, torch 2.13 (not reduced to a reproducer without fsa ops,
so no upstream issue yet): the backward of the plain gather ``x[:, tokens]`` is an accumulating ``index_put`` into
zeros. Inductor shares that zeros buffer with the zeros of RoPE's slice backward, turns the index_put into an
in-place one on it, and fuses the add of its result into a kernel that runs *before* the index_put: the compress
path's share of dk is silently lost. ``tests/test_compile.py::test_inductor_bug_shared_zeros_index_put`` pins it
(strict xfail): when torch fixes it, that test fails and this workaround can go. The cost is one fusion: the
gather and the position add are two passes on CPU.

On CUDA, where compiled gradients match eager, the plain gather stays and Inductor fuses it (gather, position
add and layout in one kernel).
"""

OPAQUE_WINDOW_DEVICES = ("cpu",)
