"""``fsa_compile.lowerings``: the Inductor side of the ``fsa`` ops.

Empty for now: the ops compile as opaque extern calls and the gating and combination around them fuse as
ordinary pointwise PyTorch. Lowerings that fuse into the sparse kernels come with the Triton kernels.
"""
