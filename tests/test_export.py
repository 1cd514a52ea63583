"""torch.export keeps the fsa ops; an AOTInductor package runs in a fresh process after ``import fsa_compile``."""

import subprocess
import sys

import torch

from tests._testing import DEVICE, make_small_layer

FSA_OPS = [
    "fsa.compressed_attention.default", "fsa.select_blocks.default", "fsa.selected_attention.default",
    "fsa.sliding_window_attention.default",
]


def test_export_keeps_fsa_ops():
    layer = make_small_layer()
    x = torch.randn(2, 45, 64, device=DEVICE)
    program = torch.export.export(layer, (x,))
    targets = sorted({str(node.target) for node in program.graph.nodes if str(node.target).startswith("fsa.")})
    assert targets == FSA_OPS
    torch.testing.assert_close(program.module()(x), layer(x))


def test_aoti_package_runs_in_a_fresh_process(tmp_path):
    layer = make_small_layer()
    x = torch.randn(1, 45, 64, device=DEVICE)
    program = torch.export.export(layer, (x,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "layer.pt2"))
    torch.save({"x": x, "y": layer(x).detach()}, tmp_path / "io.pt")
    script = (
        "import torch, fsa_compile\n"
        f"data = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"runner = torch._inductor.aoti_load_package({package!r})\n"
        "torch.testing.assert_close(runner(data['x']), data['y'])\n"
        "print('matched')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "matched" in result.stdout, result.stderr[-3000:]
