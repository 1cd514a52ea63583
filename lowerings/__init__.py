"""``fsa_compile.lowerings``: the Inductor side of the ``fsa`` ops.

Empty on purpose, for now. The ops compile as opaque extern calls, and Inductor's default lowering already
fuses the gate sigmoid (with the gate projection's bias) and the three-way combination into one pointwise
kernel per layer, on CPU (C++) and on CUDA (Triton). ``tests/lowerings/test_combine.py`` pins both kernel
lists, so a fusion regression fails a test. The remaining copies in the compiled graph are the layout change
of ``compress``'s output (1/stride of the tokens). A lowering belongs here once a fusion into the sparse
kernels' epilogues is attempted.
"""
