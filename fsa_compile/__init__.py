"""Flash Sparse Attention as PyTorch operators.

``import fsa_compile`` registers ``torch.ops.fsa.compressed_attention``, ``select_blocks``,
``selected_attention`` and ``sliding_window_attention`` (and their backward ops).
"""

from fsa_compile import ops  # noqa: F401  (registers torch.ops.fsa.*)
from fsa_compile import lowerings
from fsa_compile._compiled_glue import set_compiled_glue
from fsa_compile.compression import compress
from fsa_compile.functional import (
    check_cu_seqlens,
    compressed_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from fsa_compile.kv_cache import CUDAGraphStep, NSACache
from fsa_compile.modules import FlashSparseAttention
from fsa_compile.ops._eager_graphs import set_eager_cuda_graphs

lowerings.register()

__version__ = "0.1.0"

__all__ = [
    "CUDAGraphStep",
    "FlashSparseAttention",
    "NSACache",
    "check_cu_seqlens",
    "compress",
    "compressed_attention",
    "nsa_attention",
    "select_blocks",
    "selected_attention",
    "set_compiled_glue",
    "set_eager_cuda_graphs",
    "sliding_window_attention",
]
