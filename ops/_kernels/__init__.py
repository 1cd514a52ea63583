"""``@triton.jit`` kernels of the ops (CUDA path); no torch.library code and no allocation policy here."""
