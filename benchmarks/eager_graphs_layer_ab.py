"""The layer with the ops' eager CUDA graphs on vs off, in interleaved rounds, compiled and eager.

    python benchmarks/eager_graphs_layer_ab.py --seqlen 32768 --groups 1

Forward+backward ms per step: 10 steps back to back, and ``cuda_time_ms`` (bench_layer.py's single step after an L2
flush, median). bf16, Hkv = 4, D = 128, the layer's defaults. Compiled code traces the ops into Triton kernels; what
the graphs change there is the opaque cuDNN compressed ops (``ops/_compressed_dense.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from _harness import back_to_back_ms, cuda_time_ms  # noqa: E402
from bench_layer import forward_backward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--groups", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"T={args.seqlen}")
    for group in args.groups:
        hkv, d = 4, 128
        hq = group * hkv
        layer = fsa_compile.FlashSparseAttention(hq * d, hq, hkv, d, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, args.seqlen, hq * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        torch._dynamo.reset()
        for title, model in (("compiled", torch.compile(layer, fullgraph=True)), ("eager", layer)):
            step = forward_backward(model, x, grad)
            results = {"on": [], "off": []}
            for _ in range(args.rounds):
                for mode in ("off", "on"):
                    fsa_compile.set_eager_cuda_graphs(None if mode == "off" else 2 << 30)
                    for _ in range(3):  # the second call captures
                        step()
                    results[mode].append((back_to_back_ms(step), cuda_time_ms(step)))
            for mode, rows in results.items():
                print(f"G={group} {title} eager-graphs {mode}: back-to-back "
                      + " ".join(f"{wall:.2f}" for wall, _ in rows)
                      + " | cuda_time_ms " + " ".join(f"{single:.2f}" for _, single in rows), flush=True)


if __name__ == "__main__":
    main()
