"""Where the selected-attention op's time goes: torch.profiler's CUDA kernel table of one forward and one backward.

    python benchmarks/profile_selected.py --seqlen 65536 --groups 1 4 [--impl fsa]

bf16, Hkv = 4, D = 128, block 64, topk 16, the indices of ``bench_selected.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402,F401
from _harness import SelectedConfig  # noqa: E402
from bench_selected import make_indices  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=65536)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--impl", default="fsa")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    for group in args.groups:
        config = SelectedConfig(seqlen=args.seqlen, group=group)
        q = torch.randn(1, config.seqlen, config.num_heads, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, config.seqlen, 4, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        indices = make_indices(config, "cuda")
        o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, 64, None, None, args.impl)
        do = torch.randn_like(o)
        steps = {
            "fwd": lambda: torch.ops.fsa.selected_attention(q, k, v, indices, 64, None, None, args.impl),
            "bwd": lambda: torch.ops.fsa.selected_attention_backward(
                do, None, q, k, v, o, lse, indices, 64, None, None, args.impl),
        }
        for name, step in steps.items():
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(torch.cuda.get_device_name(), f"T={args.seqlen} G={group} impl={args.impl} {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
