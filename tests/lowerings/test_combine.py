"""Fusion is asserted, not hoped for: the generated kernels of one compiled NSA layer, pinned per backend
(CPU: Inductor C++; CUDA: Inductor Triton, in the GPU run).

The gate sigmoid and the three-way combination ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` come out as one
fused kernel. On CPU the sparse branches stay opaque ``torch.ops.fsa`` calls; on CUDA Inductor launches their
Triton kernels itself. Regenerate the pinned lists with
``EXPECTTEST_ACCEPT=1 python -m pytest tests/lowerings/test_combine.py`` (on a GPU machine for the CUDA one)
after an intended change.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expecttest import assert_expected_inline
from torch._inductor.utils import run_and_get_code

from tests._testing import DEVICE, make_small_layer

# Inductor's generated kernel definitions: C++ on CPU, Triton on CUDA.
# On CUDA the fsa ops' own Triton kernels are launched from the generated code too (ops/_library.py).
KERNEL_PATTERN = {"cpu": r"(cpp_fused_\w+) = async_compile", "cuda": r"\w+ = async_compile\.triton\('(\w+)'"}


def generated_kernels(device: str) -> tuple[list[str], list[str]]:
    """(sorted kernel names, sorted fsa ops called) of one compiled forward of the small layer."""
    torch._dynamo.reset()
    layer = make_small_layer().to(device)
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(torch.compile(layer, fullgraph=True), torch.randn(2, 45, 64, device=device))
    torch._dynamo.reset()
    code = "\n".join(codes)
    kernels = sorted(set(re.findall(KERNEL_PATTERN[device], code)))
    calls = sorted(set(re.findall(r"torch\.ops\.fsa\.(\w+)\.default\(", code)))
    return kernels, calls


@pytest.fixture(scope="module")
def cpu_kernels():
    return generated_kernels("cpu")


needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_kernels():
    return generated_kernels("cuda")


def _assert_gate_and_combination_fused(kernels):
    gate_kernels = [name for name in kernels if "sigmoid" in name]
    assert len(gate_kernels) == 1 and all(op in gate_kernels[0] for op in ("add", "mul")), kernels


def test_gate_and_combination_fuse_into_one_kernel(cpu_kernels):
    _assert_gate_and_combination_fused(cpu_kernels[0])


@pytest.mark.gpu
@needs_cuda
def test_gate_and_combination_fuse_into_one_kernel_cuda(cuda_kernels):
    _assert_gate_and_combination_fused(cuda_kernels[0])


# Inductor's own kernels around the ops (projections, RoPE, compression, gates) in one compiled forward of the small
# layer on the H200, torch 2.11: 19 in one run and 20 in another of the same code (2026-12-03: whether a small matmul
# became its own kernel), with different fused-op names; so their number is bounded, not pinned. (Likely the
# first-compile effect that test_first_compile_in_a_process_equals_later_ones covers, fixed since; not yet
# re-checked on a GPU.)
MAX_INDUCTOR_KERNELS_CUDA = 20


@pytest.mark.gpu
@needs_cuda
def test_pinned_kernel_list_cuda(cuda_kernels):
    """Pinned on the H200, torch 2.11 (2026-12-03): the fsa ops' Triton kernels that Inductor launches itself, and at
    most MAX_INDUCTOR_KERNELS_CUDA kernels of Inductor's own."""
    kernels, calls = cuda_kernels
    own = [name for name in kernels if not name.startswith("triton_")]
    assert_expected_inline("\n".join(own + calls), """\
_masked_attention_fwd_kernel
_select_blocks_kernel
_selected_attention_nsa_fwd_kernel""")
    assert len(kernels) - len(own) <= MAX_INDUCTOR_KERNELS_CUDA, kernels


# Inductor's fusion choices change between releases (torch 2.11 fuses the CPU layer into other kernels): the CPU
# list is pinned on CI's torch; the fusion of the gate and combination is asserted on every version above.
CPU_PINNED_TORCH = "2.13."


@pytest.mark.skipif(not torch.__version__.startswith(CPU_PINNED_TORCH),
                    reason=f"the CPU kernel list is pinned on torch {CPU_PINNED_TORCH}x (CI's)")
def test_pinned_kernel_list(cpu_kernels):
    kernels, calls = cpu_kernels
    assert_expected_inline(
        "\n".join(kernels + calls),
        """\
cpp_fused__to_copy__unsafe_view_add_addcmul_arange_cat_clone_compressed_attention_cos_div_flip_mul_neg_pow_select_sin_slice_split_split_with_sizes_transpose_unsqueeze_view_2
cpp_fused__to_copy__unsafe_view_addcmul_arange_cat_cos_div_flip_mul_neg_pow_split_split_with_sizes_unsqueeze_view_3
cpp_fused__unsafe_view_bmm_cat_clone_expand_permute_slice_split_with_sizes_transpose_view_1
cpp_fused__unsafe_view_clone_selected_attention_sliding_window_attention_split_split_with_sizes_view_4
cpp_fused_add_mul_sigmoid_slice_view_5
cpp_fused_cat_0
compressed_attention
select_blocks
selected_attention
sliding_window_attention""",
    )


def test_first_compile_in_a_process_equals_later_ones():
    """Inductor registers an opaque op's fallback while lowering its first node; registered that late, the rotated
    q read by four fsa ops was recomputed into four buffers in a process's first compile and stored once in later
    ones. fsa_compile.lowerings registers the fallbacks before lowering; a fresh process checks it."""
    script = ("from tests.lowerings.test_combine import generated_kernels\n"
              "first, later = generated_kernels('cpu'), generated_kernels('cpu')\n"
              "assert first == later, (first, later)\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
