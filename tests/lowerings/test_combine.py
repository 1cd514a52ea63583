"""Fusion is asserted, not hoped for: the generated kernels of one compiled NSA layer (CPU, Inductor C++).

The gate sigmoid and the three-way combination ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` come out as one
fused kernel; the sparse branches stay opaque ``torch.ops.fsa`` calls. Regenerate the pinned list with
``EXPECTTEST_ACCEPT=1 python -m pytest tests/lowerings/test_combine.py`` after an intended change.
"""

import re

import pytest
import torch
from expecttest import assert_expected_inline
from torch._inductor.utils import run_and_get_code

from tests._testing import DEVICE, make_small_layer

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="pins the CPU (C++) kernel list; CUDA names differ")


@pytest.fixture(scope="module")
def generated_code():
    torch._dynamo.reset()
    layer = make_small_layer()
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(torch.compile(layer, fullgraph=True), torch.randn(2, 45, 64))
    torch._dynamo.reset()
    return "\n".join(codes)


def test_gate_and_combination_fuse_into_one_kernel(generated_code):
    kernels = sorted(set(re.findall(r"(cpp_fused_\w+) = async_compile", generated_code)))
    gate_kernels = [name for name in kernels if "sigmoid" in name]
    assert len(gate_kernels) == 1 and all(op in gate_kernels[0] for op in ("add", "mul")), kernels


def test_pinned_kernel_list(generated_code):
    kernels = sorted(set(re.findall(r"(cpp_fused_\w+) = async_compile", generated_code)))
    calls = [name for name in re.findall(r"torch\.ops\.fsa\.(\w+)\.default\(", generated_code)]
    assert_expected_inline(
        "\n".join(kernels + sorted(set(calls))),
        """\
cpp_fused__to_copy__unsafe_view_add_arange_cos_div_mul_neg_pow_sin_slice_sub_unsqueeze_view_0
cpp_fused__to_copy__unsafe_view_add_arange_cos_div_mul_neg_pow_sin_slice_sub_unsqueeze_view_4
cpp_fused__to_copy_add_arange_clone_cos_div_mul_neg_pow_sin_slice_sub_transpose_unsqueeze_view_2
cpp_fused__unsafe_view_add_arange_clamp_clone_expand_index_mul_permute_transpose_unsqueeze_view_1
cpp_fused_add_mul_sigmoid_slice_view_5
cpp_fused_clone_compressed_attention_transpose_view_3
compressed_attention
select_blocks
selected_attention
sliding_window_attention""",
    )
