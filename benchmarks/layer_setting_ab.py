"""The layer under two values of one launch setting (``ops/_settings.py``), in interleaved rounds, compiled and
eager, with the dense-SDPA layer timed the same way in the same run as the baseline.

    python benchmarks/layer_setting_ab.py --setting compiled_glue --values false true --seqlen 32768 --groups 1 4
    python benchmarks/layer_setting_ab.py --setting eager_cuda_graphs --values null '{"max_bytes": 2147483648}'

Values are JSON. Forward+backward ms per step: 10 steps back to back (a training loop's steady state, host and GPU
overlapping) and ``cuda_time_ms`` (bench_layer.py's single step after an L2 flush, median). bf16, Hkv = 4, D = 128,
the layer's defaults. The compiled layer is compiled once per value (a setting read only in eager mode, such as
``compiled_glue``, leaves it as it is); the compiled rows are skipped with ``--no-compiled``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from fsa_compile.ops import _settings as settings  # noqa: E402
from _harness import back_to_back_ms, cuda_time_ms  # noqa: E402
from bench_layer import dense_causal_layer, forward_backward  # noqa: E402


def timings(step, rounds_warmup: int = 3) -> tuple[float, float]:
    for _ in range(rounds_warmup):  # compiles, and the ops' eager graphs capture on their second call
        step()
    return back_to_back_ms(step), cuda_time_ms(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, help="a name in ops/_settings.py")
    parser.add_argument("--values", nargs=2, type=json.loads, required=True, metavar="JSON")
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--groups", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    settings.get(args.setting)  # a typo fails before any timing
    print(torch.cuda.get_device_name(), f"T={args.seqlen}",
          f"{args.setting}: A={args.values[0]!r} B={args.values[1]!r}")
    for group in args.groups:
        hkv, d = 4, 128
        hq = group * hkv
        layer = fsa_compile.FlashSparseAttention(hq * d, hq, hkv, d, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, args.seqlen, hq * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        sdpa = timings(forward_backward(dense_causal_layer(layer), x, grad))
        results = {}
        for _ in range(args.rounds):
            for label, value in zip("AB", args.values):
                with settings.override(args.setting, value):
                    models = [("eager", layer)]
                    if args.compiled:
                        torch._dynamo.reset()
                        models.append(("compiled", torch.compile(layer, fullgraph=True)))
                    for title, model in models:
                        results.setdefault((title, label), []).append(timings(forward_backward(model, x, grad)))
        print(f"G={group} SDPA layer (eager): back-to-back {sdpa[0]:.2f} | cuda_time_ms {sdpa[1]:.2f}")
        for (title, label), rows in results.items():
            best = min(wall for wall, _ in rows)
            print(f"G={group} {title} {label}: back-to-back " + " ".join(f"{wall:.2f}" for wall, _ in rows)
                  + " | cuda_time_ms " + " ".join(f"{single:.2f}" for _, single in rows)
                  + f" | SDPA / best back-to-back {sdpa[0] / best:.2f}x", flush=True)


if __name__ == "__main__":
    main()
