"""CUDA-graph replay of eager op calls on CUDA: no per-call host floor.

An eager fsa op on CUDA is ten or so Triton launches, torch ops (a sort, fills, a cumsum) and allocations; at 16K
tokens their host time (~0.7 ms per selected_attention call on the H200's host) exceeds the GPU time (~0.45 ms), so
the GPU waits on Python. Every Triton path is sync-free and sized from shapes alone, so a call is a fixed
sequence of kernels given its arguments' metadata. From the second call with the same metadata (shapes, strides,
dtypes, device, the non-tensor arguments, deterministic mode; a change of launch settings drops every graph) the
implementation is captured once in a CUDA graph over static copies of its tensor arguments; later calls copy their
tensors in, replay the graph and return copies of its outputs: the same kernels on the same values, so the same
results bit for bit.
The graph is kept only where the call is host-bound: the host time of a direct call (timed once, at capture)
exceeds the graph's GPU time; elsewhere the copies would cost more than the host time they hide (16K tokens,
G = 4: 1.30 -> 1.33 ms per forward, H200).

Memory: a graph keeps its static inputs and its private memory pool (the call's intermediates, e.g. FSA's partial
outputs) for as long as it is cached. Graphs are cached while their total stays within the ``eager_cuda_graphs``
setting's ``max_bytes`` (``fsa_compile.set_eager_cuda_graphs``); once it is full, calls with new metadata run
directly (nothing is evicted: calls that alternate between two graphs must not capture again and again).

Graphed are calls on the device's default stream only. Elsewhere they run directly: while a stream is capturing
(the caller's own CUDA graph), on a side stream (torch.compile's cudagraph trees warm up on one while routing the
thread's allocations to their own memory pool, where static inputs must not land; the caller's own streams), on CPU
tensors, and every call when the setting is None. The cache is per process and not thread-safe: one thread calls the
ops, as in eager training and serving loops.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from . import _settings


class _Graph:
    """One captured call: its graph, static arguments and outputs."""

    def __init__(self, implementation: Callable, args: tuple, device: torch.device):
        # The call's arguments with every tensor replaced by a static copy that the graph reads.
        self.static_args = [torch.empty_like(a).copy_(a) if isinstance(a, torch.Tensor) else a for a in args]
        input_bytes = sum(a.untyped_storage().nbytes() for a in self.static_args if isinstance(a, torch.Tensor))
        current = torch.cuda.current_stream(device)
        # Runs outside the capture first, on a side stream as torch.cuda.graphs advises: Triton compiles for the
        # static tensors' alignment there, not during the capture. The second run times the host work of a call.
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            implementation(*self.static_args)
            start = time.perf_counter()
            implementation(*self.static_args)
            self.host_seconds = time.perf_counter() - start
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            reserved = torch.cuda.memory_reserved(device)  # after torch.cuda.graph's empty_cache
            self.outputs = implementation(*self.static_args)  # tensors of the graph's pool
            pool_bytes = torch.cuda.memory_reserved(device) - reserved
        self.num_bytes = input_bytes + pool_bytes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(current)
        self.graph.replay()
        end.record(current)
        end.synchronize()
        self.gpu_seconds = start.elapsed_time(end) / 1e3

    def replay(self, args: tuple):
        # On the default stream, as every call that reaches a graph: stream order protects the static tensors.
        for static, arg in zip(self.static_args, args):
            if isinstance(arg, torch.Tensor):
                static.copy_(arg)
        self.graph.replay()
        if isinstance(self.outputs, torch.Tensor):
            return self.outputs.clone()
        return tuple(None if out is None else out.clone() for out in self.outputs)


_GRAPHS: dict[tuple, _Graph] = {}
_SIGHTINGS: dict[tuple, int] = {}  # key -> calls seen without a graph
_NEVER: set[tuple] = set()  # keys that run directly: not host-bound, over the budget, or not capturable
_MAX_SIGHTINGS = 4096  # bound on remembered keys (shapes that come once must not grow it without end)
_settings_version = _settings.version()  # of the cached graphs: a change of settings drops them


def _key(name: str, args: tuple) -> tuple | None:
    """What the call's kernels depend on besides the tensors' values; None unless its tensors are on CUDA."""
    # Inference mode: the static copies made under it could not be written outside it.
    parts = [name, torch.are_deterministic_algorithms_enabled(), torch.is_inference_mode_enabled()]
    device = None
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if not arg.is_cuda:
                return None
            device = arg.device
            parts.append((tuple(arg.shape), arg.stride(), arg.dtype))
        else:
            parts.append(tuple(arg) if isinstance(arg, list) else arg)
    if device is None:
        return None
    parts.append(device)
    return tuple(parts)


def run(name: str, implementation: Callable, args: tuple):
    """``implementation(*args)``, replayed from a CUDA graph when the ``eager_cuda_graphs`` setting allows."""
    global _settings_version
    budget = _settings.get("eager_cuda_graphs")
    if _settings_version != _settings.version():  # graphs of other settings would never be replayed again
        clear()
        _settings_version = _settings.version()
    key = None if budget is None else _key(name, args)
    if (key is None or key in _NEVER or torch.cuda.current_stream(key[-1]) != torch.cuda.default_stream(key[-1])
            or torch.cuda.is_current_stream_capturing()):
        return implementation(*args)
    graph = _GRAPHS.get(key)
    if graph is None:
        seen = _SIGHTINGS.get(key, 0) + 1
        if seen < 2:  # the first call compiles the kernels and picks launch settings; shapes seen once stay plain
            if len(_SIGHTINGS) >= _MAX_SIGHTINGS:
                _SIGHTINGS.clear()
            _SIGHTINGS[key] = seen
            return implementation(*args)
        _SIGHTINGS.pop(key, None)
        try:
            graph = _Graph(implementation, args, key[-1])
        except Exception as error:  # a path that cannot be captured (a bug: they are meant to be sync-free)
            _NEVER.add(key)
            warnings.warn(f"fsa::{name} could not be captured in a CUDA graph and runs directly: {error}")
            return implementation(*args)
        # Kept where the call is host-bound (its host work outlasts its kernels) and the graph fits the budget.
        if graph.host_seconds < graph.gpu_seconds or cached_bytes() + graph.num_bytes > budget["max_bytes"]:
            _NEVER.add(key)
            return implementation(*args)
        _GRAPHS[key] = graph
    return graph.replay(args)


def clear() -> None:
    """Drop every cached graph (their memory goes back to PyTorch's allocator) and what was learnt about keys."""
    _GRAPHS.clear()
    _SIGHTINGS.clear()
    _NEVER.clear()


def cached_bytes() -> int:
    """GPU memory the cached graphs hold (static inputs and pools)."""
    return sum(graph.num_bytes for graph in _GRAPHS.values())


def set_eager_cuda_graphs(max_bytes: int | None) -> None:
    """Let eager calls of the fsa ops on CUDA replay CUDA graphs of themselves, keeping at most ``max_bytes`` of GPU
    memory in graphs (the default budget is 2 GiB), or never (None). Drops the graphs cached so far.

    From its second call with the same shapes, strides, dtypes and non-tensor arguments, an op's CUDA path is
    captured once and, where the call is host-bound (its host time exceeds the graph's GPU time), runs as a replay:
    no per-call host time beyond copying the tensor arguments in and the outputs out, with the same results bit for
    bit. Only calls on the device's default stream are graphed (not inside a CUDA-graph capture or torch.compile's
    cudagraph trees, not on CPU tensors).
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool)):
        raise TypeError(f"max_bytes must be an int or None, got {type(max_bytes).__name__} {max_bytes!r}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    _settings.replace("eager_cuda_graphs", None if max_bytes is None else dict(max_bytes=max_bytes))
    clear()
