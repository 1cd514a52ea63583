"""The ops back to back, as in a training loop, next to bench_selected.py's single cold-L2 calls.

    python benchmarks/steady_state_ops.py --seqlen 65536 --groups 1 4 [--impl fsa]
    python benchmarks/steady_state_ops.py --seqlen 16384 --groups 1 --fused-index-inversion both  # A/B
    python benchmarks/steady_state_ops.py --seqlen 16384 --groups 1 --eager-cuda-graphs both  # A/B
    python benchmarks/steady_state_ops.py --seqlen 16384 --groups 1 4 --ops layer  # the layer's other ops

``--ops selected`` (the default): selected attention forward and backward op. ``--ops layer``: the layer's other
ops at its defaults (kernel 32/16, block 64, top-16, window 512): compressed attention forward and backward (cuDNN
or Triton as ``compressed_dense`` picks), select_blocks, sliding-window attention forward and backward.

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
from fsa_compile.ops import _settings as settings, num_compressed  # noqa: E402
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


def layer_ops_problem(config: SelectedConfig, device="cuda") -> dict:
    """Raw calls of the layer's other ops on bf16 inputs of ``config`` (backward ops on their forward's o, lse and
    a random do)."""
    B, T, hq, hkv, D = config.batch, config.seqlen, config.num_heads, config.num_kv_heads, config.head_dim
    kernel_size, kernel_stride, window_size = 32, 16, 512
    q = torch.randn(B, T, hq, D, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, hkv, D, device=device, dtype=torch.bfloat16) for _ in range(2))
    num_cmp = num_compressed(T, kernel_size, kernel_stride)
    k_cmp, v_cmp = (torch.randn(B, num_cmp, hkv, D, device=device, dtype=torch.bfloat16) for _ in range(2))
    fsa = torch.ops.fsa
    o_cmp, lse_cmp = fsa.compressed_attention(q, k_cmp, v_cmp, kernel_size, kernel_stride)
    o_win, lse_win = fsa.sliding_window_attention(q, k, v, window_size)
    do = torch.randn_like(o_cmp)
    return {
        "compressed fwd": lambda: fsa.compressed_attention(q, k_cmp, v_cmp, kernel_size, kernel_stride),
        "compressed bwd": lambda: fsa.compressed_attention_backward(
            do, None, q, k_cmp, v_cmp, o_cmp, lse_cmp, kernel_size, kernel_stride),
        "select_blocks": lambda: fsa.select_blocks(q, k_cmp, lse_cmp, kernel_size, kernel_stride,
                                                   config.block_size, config.topk, 1, 2),
        "window fwd": lambda: fsa.sliding_window_attention(q, k, v, window_size),
        "window bwd": lambda: fsa.sliding_window_attention_backward(do, None, q, k, v, o_win, lse_win, window_size),
    }


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
    parser.add_argument("--ops", choices=("selected", "layer"), default="selected")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"T={args.seqlen} impl={args.impl}")
    modes = {"on": [True], "off": [False], "both": [False, True]}
    for group in args.groups:
        config = SelectedConfig(seqlen=args.seqlen, group=group)
        steps = selected_problem(config, args.impl)[0] if args.ops == "selected" else layer_ops_problem(config)
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
