"""``fsa_compile.ops``: the ``torch.ops.fsa.*`` custom operators, one module each.

Importing this package registers every op (and its backward op) in the ``fsa`` namespace.
"""

from .compressed_attention import compressed_attention
from .compression_windows import compression_windows
from .select_blocks import select_blocks
from .selected_attention import selected_attention
from .sliding_window_attention import sliding_window_attention

__all__ = [
    "compressed_attention", "compression_windows", "select_blocks", "selected_attention", "sliding_window_attention",
]
