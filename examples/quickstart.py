"""Build a FlashSparseAttention layer, run forward and backward, print shapes and timings.

    python examples/quickstart.py                 # CPU by default, the GPU when there is one
    python examples/quickstart.py --seqlen 8192 --device cuda
"""

import argparse
import time

import torch

import fsa_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default: 1024 CPU, 8192 GPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seqlen = args.seqlen or (8192 if device.type == "cuda" else 1024)

    layer = fsa_compile.FlashSparseAttention(
        hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64,
        kernel_size=32, kernel_stride=16, block_size=64, topk=16, window_size=512,
    ).to(device=device, dtype=dtype)
    print(layer)
    x = torch.randn(args.batch, seqlen, 1024, device=device, dtype=dtype, requires_grad=True)
    # The same tokens as packed variable-length sequences (B = 1).
    half = seqlen // 2 + 1
    cu_seqlens = torch.tensor([0, half, args.batch * seqlen], dtype=torch.int32, device=device)
    packed = x.detach().reshape(1, -1, 1024).requires_grad_()

    for name, inputs in (("batched", (x,)), ("packed varlen", (packed, cu_seqlens))):
        for step in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = layer(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward = time.perf_counter() - start
            out.float().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
            print(f"{name:14s} step {step}: input {tuple(inputs[0].shape)} -> output {tuple(out.shape)} {out.dtype}, "
                  f"forward {forward * 1e3:8.1f} ms, forward+backward {total * 1e3:8.1f} ms")
    grad_norm = sum(p.grad.float().norm() ** 2 for p in layer.parameters()) ** 0.5
    print(f"device {device}, dtype {dtype}, parameter grad norm {grad_norm:.4f}")


if __name__ == "__main__":
    main()
