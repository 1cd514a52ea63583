"""Where the selected-attention op's time goes: torch.profiler's CUDA kernel table of one forward and one backward.

    python benchmarks/profile_selected.py --seqlen 65536 --groups 1 4 [--impl fsa]

bf16, Hkv = 4, D = 128, block 64, topk 16, the indices of ``bench_selected.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402,F401
from _harness import SelectedConfig, print_kernel_table  # noqa: E402
from bench_selected import selected_problem  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=65536)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--impl", default="fsa")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    for group in args.groups:
        steps, _ = selected_problem(SelectedConfig(seqlen=args.seqlen, group=group), args.impl)
        for name, step in steps.items():
            print_kernel_table(step, f"T={args.seqlen} G={group} impl={args.impl} {name}", args.rows, name_width=70)


if __name__ == "__main__":
    main()
