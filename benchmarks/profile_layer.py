"""Where the FlashSparseAttention layer's time goes: torch.profiler's CUDA kernel table of one forward+backward.

    python benchmarks/profile_layer.py --seqlen 65536 --group 4 --rows 30 [--part project]

bf16, Hkv = 4, D = 128, hidden = Hq * D, the layer's defaults. ``--part project`` profiles only
``layer.project`` (projections, gates, compression, RoPE) with its backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from _harness import print_kernel_table  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=65536)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--part", choices=["layer", "project"], default="layer")
    args = parser.parse_args()
    hkv, d = 4, 128
    hq = args.group * hkv
    layer = fsa_compile.FlashSparseAttention(hq * d, hq, hkv, d, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, args.seqlen, hq * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(x) if args.part == "layer" else layer.project(x)
        outputs = (out,) if isinstance(out, torch.Tensor) else tuple(out.values())
        sum(t.float().sum() for t in outputs if t.requires_grad).backward()

    print_kernel_table(step, f"T={args.seqlen} G={args.group} part={args.part}", args.rows)


if __name__ == "__main__":
    main()
