"""Selected attention back to back, as in a training loop, next to bench_selected.py's single cold-L2 calls.

    python benchmarks/steady_state_selected.py --seqlen 65536 --groups 1 4 [--impl fsa]
    python benchmarks/steady_state_selected.py --seqlen 16384 --groups 1 --fused-index-inversion both  # A/B
    python benchmarks/steady_state_selected.py --seqlen 16384 --groups 1 --eager-cuda-graphs both  # A/B

Per call: ms over 10 calls back to back in eager mode, and over 10 replays of a CUDA graph of it (GPU time without
host overhead; capturing it also proves that the op does not synchronise with the host), and the host time of one
eager call with the GPU idle (the median of 20). Eager calls replay the op's own CUDA graphs unless
``--eager-cuda-graphs off`` (``fsa_compile.set_eager_cuda_graphs``). bf16, Hkv = 4, D = 128, block
64, top-16, the indices of bench_selected.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from fsa_compile.ops import _settings as settings  # noqa: E402
from _harness import SelectedConfig, back_to_back_ms  # noqa: E402
from bench_selected import selected_problem  # noqa: E402


def host_us(run, calls: int = 20) -> float:
    """Median host time of one call made with the GPU idle."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def graph_of(step) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=65536)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--impl", default="fsa")
    parser.add_argument("--fused-index-inversion", choices=("on", "off", "both"), default="on",
                        help="the setting fused_index_inversion (FSA work items in three launches, the default); "
                             "both: an A/B")
    parser.add_argument("--eager-cuda-graphs", choices=("on", "off", "both"), default="on",
                        help="eager calls replay the op's own CUDA graphs (the default); both: an A/B")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"T={args.seqlen} impl={args.impl}")
    modes = {"on": [True], "off": [False], "both": [False, True]}
    for group in args.groups:
        steps, _ = selected_problem(SelectedConfig(seqlen=args.seqlen, group=group), args.impl)
        for name, step in steps.items():
            for fused_inversion in modes[args.fused_index_inversion]:
                for eager_graphs in modes[args.eager_cuda_graphs]:
                    fsa_compile.set_eager_cuda_graphs(2 << 30 if eager_graphs else None)
                    with settings.override("fused_index_inversion", fused_inversion):
                        back_to_back_ms(step, 3)
                        eager = back_to_back_ms(step)
                        host = host_us(step)
                        graph = graph_of(step)
                        replay = back_to_back_ms(graph.replay)
                    tags = [tag for tag, on in (("fused index inversion", fused_inversion),
                                                ("eager CUDA graphs", eager_graphs)) if on]
                    print(f"G={group} {name}{' (' + ', '.join(tags) + ')' if tags else ''}: eager back to back "
                          f"{eager:.2f} ms/call (host {host:.0f} us/call), CUDA graph replay {replay:.2f} ms/call",
                          flush=True)


if __name__ == "__main__":
    main()
