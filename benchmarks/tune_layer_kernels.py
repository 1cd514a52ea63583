"""Sweep the launch settings of the masked-attention (compressed, window) and select_blocks kernels.

    python benchmarks/tune_layer_kernels.py --seqlens 65536 --groups 1 4

bf16, Hkv = 4, D = 128, the layer's defaults (kernel 32/16, block 64, top-16, window 512). Prints ms per
setting (tried through ``fsa_compile.ops._settings.override``); the winners go into ``ops/_settings.py``
(``masked_fwd``, ``masked_bwd_dq``, ``masked_bwd_dkdv``, ``masked_dkdv_max_chunks``, ``masked_dkdv_chunk_tokens``,
``select_blocks``). The backward is timed whole while one of its two kernels sweeps and the other keeps its tuned
setting.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from _harness import cuda_time_ms, device_meta  # noqa: E402
from fsa_compile.ops._settings import override  # noqa: E402

TILE = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

FORWARD = [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages). dq: BLOCK_M rows per program, BLOCK_N keys per step. dk/dv:
# BLOCK_N keys per program, BLOCK_M rows per step.
DQ = [(64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 4, 2),
      (64, 64, 4, 3)]
DKDV = [(64, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (16, 128, 4, 2),
        (64, 128, 4, 2), (64, 64, 4, 3)]
# (masked_dkdv_max_chunks, masked_dkdv_chunk_tokens): how the dk/dv kernel splits the tokens of a key tile.
CHUNKS = [(1, 4096), (4, 4096), (8, 4096), (16, 2048), (8, 2048), (32, 1024)]
SELECT = [(64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 8, 2), (128, 8, 2), (64, 4, 1), (16, 4, 2)]


def timed(fn):
    try:
        return f"{cuda_time_ms(fn, budget_s=0.25):7.2f}"
    except Exception as error:  # noqa: BLE001  (a misfit setting is reported, not fatal)
        return f"{type(error).__name__[:7]:>7}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[65536])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sweeps", nargs="+", default=["fwd", "bwd", "select"], choices=["fwd", "bwd", "chunks", "select"])
    args = parser.parse_args()
    print(device_meta()["device"])
    hkv, d = 4, 128
    for T, group in itertools.product(args.seqlens, args.groups):
        hq = group * hkv
        q = torch.randn(1, T, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        k_cmp = torch.randn(1, (T - 32) // 16 + 1, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v_cmp = torch.randn_like(k_cmp, requires_grad=True)
        ops = {
            "compressed": lambda: fsa_compile.compressed_attention(q, k_cmp, v_cmp, 32, 16),
            "window": lambda: fsa_compile.sliding_window_attention(q, k, v, 512),
        }
        for name, op in ops.items():
            o, lse = op()
            do = torch.randn_like(o)
            for setting in FORWARD if "fwd" in args.sweeps else ():
                with override("masked_fwd", (dict(zip(TILE, setting)),)), torch.no_grad():
                    print(f"T={T} G={group} {name:10s} fwd {setting}: {timed(op)} ms")
            inputs = (q, k_cmp, v_cmp) if name == "compressed" else (q, k, v)
            for kernel, sweep in (("masked_bwd_dq", DQ), ("masked_bwd_dkdv", DKDV)) if "bwd" in args.sweeps else ():
                for setting in sweep:
                    with override(kernel, (dict(zip(TILE, setting)),)):
                        print(f"T={T} G={group} {name:10s} bwd {kernel[11:]:4s} {setting}: "
                              f"{timed(lambda: torch.autograd.grad(o, inputs, do, retain_graph=True))} ms")
            for most, tokens in CHUNKS if "chunks" in args.sweeps else ():
                with override("masked_dkdv_max_chunks", most), override("masked_dkdv_chunk_tokens", tokens):
                    print(f"T={T} G={group} {name:10s} bwd chunks {(most, tokens)}: "
                          f"{timed(lambda: torch.autograd.grad(o, inputs, do, retain_graph=True))} ms")
        with torch.no_grad():
            _, lse = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 32, 16)
            first = None
            for setting in SELECT if "select" in args.sweeps else ():
                with override("select_blocks", (dict(zip(("rows", "num_warps", "num_stages"), setting)),)):
                    run = lambda: fsa_compile.select_blocks(q, k_cmp, lse, 32, 16, 64, 16, 1, 2)  # noqa: E731
                    indices = run()
                    first = indices if first is None else first
                    differ = (indices != first).any(-1).float().mean().item()
                    print(f"T={T} G={group} select         {setting}: {timed(run)} ms  "
                          f"rows differing from the first: {differ:.2e}")


if __name__ == "__main__":
    main()
