"""``fsa_compile.ops``: the ``torch.ops.fsa.*`` custom operators, one module each.

Importing this package registers every op (and its backward op) in the ``fsa`` namespace. The modules import as
themselves (``fsa_compile.ops.selected_attention`` is the module; the op is ``torch.ops.fsa.selected_attention``
or the module's ``selected_attention`` attribute). The names below are the helpers the rest of the package uses.
"""

from . import compressed_attention, compression_windows, select_blocks, selected_attention, sliding_window_attention
from ._layout import SequenceLayout, check_cu_seqlens_values, max_compressed_rows, num_compressed
from ._validation import check_argument_types, check_cu_seqlens_tensor
from .selected_attention import IMPLS as SELECTED_IMPLS

__all__ = [
    "SELECTED_IMPLS", "SequenceLayout", "check_argument_types", "check_cu_seqlens_tensor", "check_cu_seqlens_values",
    "compressed_attention", "compression_windows", "max_compressed_rows", "num_compressed",
    "select_blocks", "selected_attention", "sliding_window_attention",
]
