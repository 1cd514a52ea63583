"""torch.export keeps the fsa ops; an AOTInductor package runs in a fresh process after ``import fsa_compile``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsa_compile.lowerings import compression_windows as windows_workaround
from tests._testing import DEVICE, make_small_layer

# compression_windows only where compress gathers through it (fsa_compile/lowerings/compression_windows.py).
FSA_OPS = sorted(
    ["fsa.compressed_attention.default", "fsa.select_blocks.default", "fsa.selected_attention.default",
     "fsa.sliding_window_attention.default"]
    + (["fsa.compression_windows.default"] if DEVICE in windows_workaround.OPAQUE_WINDOW_DEVICES else [])
)


def export_with_dynamic_length(layer, x):
    length = torch.export.Dim("T", min=1, max=65536)
    return torch.export.export(layer, (x,), dynamic_shapes={"x": {1: length}})


def readme_lines(first: str, last: str) -> str:
    """The README's lines from the one starting with ``first`` to the next one containing ``last``, dedented."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return "\n".join(line.strip() for line in lines[start : end + 1])


def test_readme_export_snippet_from_one_token():
    """The README's layer and its export lines as written there, with T from 1: lengths below kernel_size (no
    compressed key), at it, and past a few blocks all run in one exported program, as in eager."""
    import fsa_compile

    scope = {"torch": torch, "fsa_compile": fsa_compile}
    exec(readme_lines("layer = fsa_compile.FlashSparseAttention(", ")"), scope)
    layer = scope["layer"].to(DEVICE)
    scope.update(layer=layer, x=torch.randn(2, 200, 1024, device=DEVICE))
    exec(readme_lines("T = torch.export.Dim(", "torch.export.export("), scope)
    program = scope["program"]
    for num_tokens in (1, 2, 31, 32, 47, 48, 333):
        x = torch.randn(2, num_tokens, 1024, device=DEVICE)
        torch.testing.assert_close(program.module()(x), layer(x))


def test_export_keeps_fsa_ops_with_a_dynamic_length():
    layer = make_small_layer()
    program = export_with_dynamic_length(layer, torch.randn(2, 45, 64, device=DEVICE))
    targets = sorted({str(node.target) for node in program.graph.nodes if str(node.target).startswith("fsa.")})
    assert targets == FSA_OPS
    for num_tokens in (45, 77):
        x = torch.randn(2, num_tokens, 64, device=DEVICE)
        torch.testing.assert_close(program.module()(x), layer(x))


def assert_package_matches_in_a_fresh_process(program, x, y, tmp_path, imports: str) -> None:
    """AOTInductor-package ``program``, load it in a new Python process that runs ``import {imports}``, and check
    that it maps x to y there."""
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save({"x": x, "y": y.detach()}, tmp_path / "io.pt")
    script = (
        f"import {imports}\n"
        f"data = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"runner = torch._inductor.aoti_load_package({package!r})\n"
        # AOTInductor's C++ kernels reduce in another order than eager (vector width depends on the CPU):
        # the compiled-vs-eager float32 tolerance of test_compile.py, not assert_close's bitwise-ish default.
        "torch.testing.assert_close(runner(data['x']), data['y'], rtol=1e-4, atol=1e-4)\n"
        "print('matched')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "matched" in result.stdout, (result.returncode, result.stderr[-3000:])


# On the project's GPU machine (torch 2.11.0+cu130, H200) loading *any* CUDA AOTInductor package segfaults inside
# AOTIModelPackageLoader's constructor, in a fresh process and in the building one, with or without CUDA
# initialised first, even for a model with no fsa op (the control below; scratch diagnostics in the issue-5 note).
AOTI_CUDA_LOAD_CRASH = pytest.mark.xfail(
    DEVICE == "cuda", strict=True,
    reason="environment: loading a CUDA AOTInductor package segfaults on the GPU machine (torch 2.11+cu130), "
           "also without fsa ops",
)


@AOTI_CUDA_LOAD_CRASH
def test_aoti_package_runs_in_a_fresh_process(tmp_path):
    layer = make_small_layer().eval()
    program = export_with_dynamic_length(layer, torch.randn(1, 45, 64, device=DEVICE))
    x = torch.randn(1, 77, 64, device=DEVICE)  # another length than the one exported with
    assert_package_matches_in_a_fresh_process(program, x, layer(x), tmp_path, "torch, fsa_compile")
    x = torch.randn(1, 3, 64, device=DEVICE)  # below kernel_size: no compressed key
    assert_package_matches_in_a_fresh_process(program, x, layer(x), tmp_path, "torch, fsa_compile")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="isolates the CUDA AOTInductor load crash")
@AOTI_CUDA_LOAD_CRASH
def test_aoti_package_without_fsa_ops_runs_in_a_fresh_process(tmp_path):
    """Control for the xfail above: the same round trip for a model with no fsa op (linear + sigmoid). It
    crashes too, so the SIGSEGV is in AOTInductor's CUDA runtime on that machine, not in the fsa ops; when
    it passes (strict xfail fails), drop both marks."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Sigmoid()).to(DEVICE).eval()
    program = torch.export.export(model, (torch.randn(4, 64, device=DEVICE),))
    x = torch.randn(4, 64, device=DEVICE)
    assert_package_matches_in_a_fresh_process(program, x, model(x), tmp_path, "torch")
