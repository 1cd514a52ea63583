"""Sweep the launch parameters of the selected-attention kernels at one shape; prints ms per setting.

    python benchmarks/tune_selected.py --seqlen 65536 --groups 1 4
    python benchmarks/tune_selected.py --seqlen 65536 --groups 4 --partial-gib 1 2 4 8   # fsa_partial_bytes

Candidates go through ``fsa_compile.ops._settings.override``; the winners belong in ``ops/_settings.py``.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402,F401
from fsa_compile.ops import _selected_launchers as launchers  # noqa: E402
from fsa_compile.ops import _settings  # noqa: E402
from _harness import SelectedConfig, cuda_time_ms  # noqa: E402
from bench_selected import selected_problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=65536)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--partial-gib", type=float, nargs="*", default=[],
                        help="time the FSA forward and backward at these partial-buffer budgets instead of sweeping launches")
    args = parser.parse_args()
    for group in args.groups:
        _, (q, k, v, indices, o, lse, do) = selected_problem(SelectedConfig(seqlen=args.seqlen, group=group))
        if args.partial_gib:
            for gib in args.partial_gib:
                timings = []
                for run in (
                    lambda: launchers.forward(q, k, v, indices, 64, None, None, "fsa"),
                    lambda: launchers.backward(do, None, q, k, v, o, lse, indices, 64, None, None, "fsa"),
                ):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    with _settings.override("fsa_partial_bytes", int(gib * 2**30)):
                        ms = cuda_time_ms(run, 0.15)
                    timings.append((ms, (torch.cuda.max_memory_allocated() - before) / 2**20))
                (fwd, fwd_peak), (bwd, bwd_peak) = timings
                print(f"G={group} partial budget {gib} GiB: fwd {fwd:7.3f} ms peak +{fwd_peak:.0f} MiB  "
                      f"bwd {bwd:7.3f} ms peak +{bwd_peak:.0f} MiB", flush=True)
            continue
        settings = [(64, 16, 4, 2), (64, 16, 4, 1), (64, 16, 4, 3), (64, 16, 8, 2), (64, 8, 4, 2), (64, 32, 4, 2),
                    (128, 16, 8, 2), (128, 16, 4, 2)]
        for block_m, steps, warps, stages in settings:
            launch = (dict(block_m=block_m, steps=steps, num_warps=warps, num_stages=stages),)
            try:
                with _settings.override("selected_fsa_fwd", launch), _settings.override("selected_fsa_bwd", launch):
                    fwd = cuda_time_ms(lambda: launchers.forward(q, k, v, indices, 64, None, None, "fsa"), 0.15)
                    bwd = cuda_time_ms(
                        lambda: launchers.backward(do, None, q, k, v, o, lse, indices, 64, None, None, "fsa"), 0.15
                    )
            except Exception as error:  # e.g. out of shared memory for a large tile
                print(f"G={group} block_m={block_m} steps={steps} warps={warps} stages={stages}: {type(error).__name__}")
                continue
            print(f"G={group} block_m={block_m:3d} steps={steps:2d} warps={warps} stages={stages}: "
                  f"fwd {fwd:7.3f} ms  bwd {bwd:7.3f} ms", flush=True)
        for warps, stages in [(4, 2), (2, 2), (8, 2)]:
            with _settings.override("selected_nsa", (dict(num_warps=warps, num_stages=stages),)):
                fwd = cuda_time_ms(lambda: launchers.forward(q, k, v, indices, 64, None, None, "nsa"), 0.15)
            print(f"G={group} nsa warps={warps} stages={stages}: fwd {fwd:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
