"""torch.export a FlashSparseAttention layer, package it with AOTInductor, load it in a fresh process.

    python examples/export_aoti.py            # CPU by default, the GPU when there is one

The package calls the ``fsa`` ops through the dispatcher, so the loading process must ``import fsa_compile``.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import fsa_compile


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = fsa_compile.FlashSparseAttention(
        hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, kernel_size=32, kernel_stride=16,
        block_size=64, topk=4, window_size=128,
    ).to(device).eval()
    x = torch.randn(1, 512, 256, device=device)
    program = torch.export.export(layer, (x,))
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("fsa.")})
    print("exported graph keeps:", ", ".join(ops))

    workdir = Path(tempfile.mkdtemp())
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(workdir / "layer.pt2"))
    torch.save({"x": x, "y": layer(x).detach()}, workdir / "io.pt")
    print("packaged:", package)
    script = (
        "import torch, fsa_compile\n"
        f"data = torch.load({str(workdir / 'io.pt')!r})\n"
        f"runner = torch._inductor.aoti_load_package({package!r})\n"
        "torch.testing.assert_close(runner(data['x']), data['y'], rtol=1e-4, atol=1e-4)\n"
        "print('fresh process: package output matches eager')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


if __name__ == "__main__":
    main()
