"""Shared benchmark harness: timing, FLOP counting, JSON output. Never imported by tests."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SelectedConfig:
    seqlen: int
    group: int  # G = Hq / Hkv
    num_kv_heads: int = 4
    head_dim: int = 128
    block_size: int = 64
    topk: int = 16
    batch: int = 1

    @property
    def num_heads(self) -> int:
        return self.group * self.num_kv_heads

    def selected_flops(self, mode: str) -> float:
        """DESIGN.md: selected fwd FLOPs = 4 * T * Hq * topk * block_size * D; bwd = 2.5x fwd."""
        fwd = 4.0 * self.batch * self.seqlen * self.num_heads * self.topk * self.block_size * self.head_dim
        return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]

    def dense_causal_flops(self, mode: str) -> float:
        fwd = 2.0 * self.batch * self.seqlen * self.seqlen * self.num_heads * self.head_dim  # 4*T^2*H*D / 2
        return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]


def cuda_time_ms(fn, budget_s: float = 0.4, max_reps: int = 50) -> float:
    """Median of CUDA-event timings; the number of repetitions adapts so slow baselines stay affordable."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first > 2e3 * budget_s:  # slow dense baselines: one timed run is all the budget allows
        return first
    reps = int(max(2, min(max_reps, budget_s * 1e3 / max(first, 1e-3))))
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")  # flush L2 between runs
    times = []
    for _ in range(reps):
        cache.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn, calls: int = 10) -> float:
    """ms per call over ``calls`` calls back to back, as in a training loop (host and GPU overlap)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def print_kernel_table(step, title: str, rows: int, name_width: int = 90) -> None:
    """Run ``step`` three times to warm up, then print torch.profiler's CUDA kernel table of one more run."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(torch.cuda.get_device_name(), title)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=name_width))


def peak_memory_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_json(path: Path, rows: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def device_meta() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": __import__("triton").__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def as_dict(config) -> dict:
    return asdict(config)
