"""Inference with the KV cache: prefill latency and per-token decode latency of the NSA layer (impl fsa and nsa)
against full causal attention with a KV cache (the same projections and RoPE around SDPA), measured in one run.

    python benchmarks/bench_inference.py                                   # H200-sized: T and contexts 16K..128K
    python benchmarks/bench_inference.py --device cpu --small              # a smoke run of every path on the CPU

Prefill: one ``layer(x, cache=cache)`` call of T tokens into an empty cache. Decode: one token appended to a cache
filled to the context (random keys, values and compressed keys; the cost of a step does not depend on them), at
batch 1 and 16: eager, replayed from a CUDA graph (``fsa_compile.CUDAGraphStep``) and compiled then replayed (the
full-attention baseline's graphed step is a masked SDPA over its static buffer, sized to the context). bf16 on
CUDA (float32 on CPU), Hkv = 4, D = 128, the layer's defaults (kernel 32/16, block 64, top-16, window 512).
Writes ``bench_inference.json`` and ``bench_inference.png`` under ``--out``; prints a table with the ratios the
inference issue asks for (FSA vs the NSA kernel at prefill, full attention vs the NSA layer at decode, the best of
each side over the decode phases).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from _harness import cuda_time_ms, print_kernel_table, write_json  # noqa: E402
from fsa_compile.compression import rotary_embedding  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the [bench] extra
    def tqdm(iterable, **_):
        return iterable

SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, local_blocks=1, window_size=32)


class FullAttentionCache:
    """The baseline: the NSA layer's q/k/v/o projections and RoPE around causal SDPA over a preallocated KV cache.

    ``cache(x)``: SDPA over the filled keys (flash/cuDNN, shapes change with the fill); ``cache.static_step(x)``: one
    token per row, SDPA over the whole buffer under a fill mask (static shapes, for a CUDA graph)."""

    def __init__(self, layer, batch_size: int, max_seqlen: int):
        shape = (batch_size, layer.num_kv_heads, max_seqlen, layer.head_dim)
        weight = layer.k_proj.weight
        self.layer, self.seqlen, self.max_seqlen = layer, 0, max_seqlen
        self.k = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=weight.device)

    def _project(self, x, positions):
        layer, (batch, num_new, _) = self.layer, x.shape
        q = rotary_embedding(layer.q_proj(x).view(batch, num_new, layer.num_heads, layer.head_dim), positions,
                             layer.rope_theta)
        k = rotary_embedding(layer.k_proj(x).view(batch, num_new, layer.num_kv_heads, layer.head_dim), positions,
                             layer.rope_theta)
        return q, k, layer.v_proj(x).view(batch, num_new, layer.num_kv_heads, layer.head_dim)

    @torch.no_grad()
    def static_step(self, x):
        layer, batch = self.layer, x.shape[0]
        position = self.seqlens.long()[:, None]  # [B, 1]
        q, k, v = self._project(x, position)
        rows = torch.arange(batch, device=x.device)
        self.k[rows, :, position[:, 0]] = k[:, 0]
        self.v[rows, :, position[:, 0]] = v[:, 0]
        # The G query heads of a KV head as G queries of it: no GQA expansion of the keys, one mask per row.
        group = layer.num_heads // layer.num_kv_heads
        queries = q.view(batch, layer.num_kv_heads, group, layer.head_dim)
        visible = (torch.arange(self.max_seqlen, device=x.device) <= position)[:, None, None, :]
        o = F.scaled_dot_product_attention(queries, self.k, self.v, attn_mask=visible)
        self.seqlens.add_(1)
        self.seqlen += 1
        return layer.o_proj(o.reshape(batch, 1, -1))

    @torch.no_grad()
    def __call__(self, x):
        layer, num_new = self.layer, x.shape[1]
        start, end = self.seqlen, self.seqlen + num_new
        q, k, v = self._project(x, torch.arange(start, end, device=x.device))
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        # Queries are the last num_new of end keys: causal from the bottom-right corner (a mask only for chunks).
        mask = None
        if 1 < num_new < end:
            mask = torch.ones(num_new, end, dtype=torch.bool, device=x.device).tril(end - num_new)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[:, :, :end], self.v[:, :, :end], attn_mask=mask,
                                           is_causal=num_new == end, enable_gqa=True)
        self.seqlen = end
        self.seqlens.fill_(end)
        return layer.o_proj(o.transpose(1, 2).flatten(2))


def time_ms(fn, device) -> float:
    if device.type == "cuda":
        return cuda_time_ms(fn)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_layer(group, impl, args, device, dtype):
    config = SMALL if args.small else {}
    heads, head_dim = 4 * group, args.head_dim
    layer = fsa_compile.FlashSparseAttention(heads * head_dim, heads, 4, head_dim, impl=impl, **config)
    return layer.to(device, dtype)


def filled_cache(cache, context: int) -> None:
    """Random contents up to ``context`` tokens (NSACache or FullAttentionCache)."""
    for name in ("k", "v", "k_cmp", "v_cmp", "recent_keys"):
        if hasattr(cache, name):
            getattr(cache, name).normal_()
    set_fill(cache, context)


def set_fill(cache, context: int) -> None:
    cache.seqlen = context
    cache.seqlens.fill_(context)


def prefill(layer, impl, seqlen, device, dtype):
    x = torch.randn(1, seqlen, layer.hidden_size, device=device, dtype=dtype)
    if impl == "full":
        cache = FullAttentionCache(layer, 1, seqlen)
    else:
        cache = fsa_compile.NSACache(layer, 1, seqlen)

    @torch.no_grad()
    def step():
        set_fill(cache, 0)
        return cache(x) if impl == "full" else layer(x, cache=cache)

    return time_ms(step, device)


def decode(layer, impl, context, batch, device, dtype, graphed=False, compiled=False, profile=False):
    x = torch.randn(batch, 1, layer.hidden_size, device=device, dtype=dtype)
    cache = (FullAttentionCache(layer, batch, context + 1) if impl == "full"
             else fsa_compile.NSACache(layer, batch, context + 1))
    filled_cache(cache, context)
    with torch.no_grad():
        if impl == "full":
            run = cache.static_step if graphed else cache
        else:
            def run(x):
                return layer(x, cache=cache)
        if compiled:
            run = torch.compile(run, dynamic=False)
        if graphed:
            run = fsa_compile.CUDAGraphStep(run, [cache], x)

    @torch.no_grad()
    def step():
        set_fill(cache, context)
        return run(x)

    if profile:
        print_kernel_table(step, f"decode step {impl} context={context} B={batch}", rows=40)
    return time_ms(step, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--small", action="store_true", help="a tiny layer config, for a CPU smoke run")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None, help="prefill lengths")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="decode contexts")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--impls", nargs="+", default=["fsa", "nsa", "full"], choices=["fsa", "nsa", "full"])
    parser.add_argument("--phases", nargs="+", default=["prefill", "decode", "decode-graph", "decode-compiled-graph"],
                        choices=["prefill", "decode", "decode-graph", "decode-compiled-graph"],
                        help="decode: eager steps; -graph: replayed from a CUDA graph; -compiled-graph: torch.compile "
                             "then a CUDA graph (one compile per shape)")
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernels of each NSA decode step")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [256, 512] if args.small else [16384, 65536, 131072]
    seqlens, contexts = args.seqlens or (sizes if args.small else [16384, 32768, 65536, 131072]), args.contexts or sizes
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "layer": SMALL if args.small else "defaults",
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    phases = [p for p in args.phases if device.type == "cuda" or p in ("prefill", "decode")]
    work = [("prefill", g, i, t, 1) for g in args.groups for t in seqlens for i in args.impls if "prefill" in phases]
    work += [(p, g, i, c, b) for p in phases if p != "prefill" for g in args.groups for c in contexts
             for b in args.batches for i in args.impls]
    rows, layers = [], {}
    for phase, group, impl, tokens, batch in tqdm(work, desc="configs"):
        key = (group, "fsa" if impl == "full" else impl)
        if key not in layers:
            layers[key] = make_layer(group, key[1], args, device, dtype)
        try:
            ms = (prefill(layers[key], impl, tokens, device, dtype) if phase == "prefill"
                  else decode(layers[key], impl, tokens, batch, device, dtype, graphed="graph" in phase,
                              compiled="compiled" in phase, profile=args.profile and impl != "full"))
        except torch.OutOfMemoryError:
            ms = float("nan")
        rows.append(dict(phase=phase, group=group, impl=impl, tokens=tokens, batch=batch, ms=ms))
        write_json(args.out / "bench_inference.json", rows, meta)  # partial results survive a timeout
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, meta)
    plot(rows, args.out / "bench_inference.png", meta)


def print_table(rows, meta) -> None:
    """Per phase: ms of each impl, FSA vs the NSA kernel, full attention vs the NSA layer; then for decode the best
    of each side over the decode phases measured (eager, graphed, compiled: the fair comparison)."""
    nan = float("nan")
    print(f"\n{meta['device']}  torch {meta['torch']}  {meta['dtype']}  Hkv=4")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print(f"{'phase':>21} {'G':>2} {'tokens':>7} {'B':>3} " + " ".join(f"{i:>10}" for i in impls)
          + "   fsa/nsa  full/layer")
    for key in dict.fromkeys((r["phase"], r["group"], r["tokens"], r["batch"]) for r in rows):
        cell = {r["impl"]: r["ms"] for r in rows if (r["phase"], r["group"], r["tokens"], r["batch"]) == key}
        layer = cell.get("fsa", cell.get("nsa", nan))
        print(f"{key[0]:>21} {key[1]:>2} {key[2]:>7} {key[3]:>3} "
              + " ".join(f"{cell.get(i, nan):8.3f}ms" for i in impls)
              + f"   {cell.get('nsa', nan) / cell.get('fsa', nan):6.2f}x  {cell.get('full', nan) / layer:9.2f}x")
    decode = [r for r in rows if r["phase"].startswith("decode")]
    if decode:
        print(f"\n{'decode, best of phases':>25} {'G':>2} {'context':>7} {'B':>3} {'layer':>10} {'full':>10}"
              "  full/layer")
        for key in dict.fromkeys((r["group"], r["tokens"], r["batch"]) for r in decode):
            same = [r for r in decode if (r["group"], r["tokens"], r["batch"]) == key]
            layer = min((r["ms"] for r in same if r["impl"] != "full"), default=nan)
            full = min((r["ms"] for r in same if r["impl"] == "full"), default=nan)
            print(f"{'':>25} {key[0]:>2} {key[1]:>7} {key[2]:>3} {layer:8.3f}ms {full:8.3f}ms  {full / layer:9.2f}x")


def plot(rows, path: Path, meta) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = list(dict.fromkeys((r["phase"], r["group"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (phase, group, batch) in zip(axes[0], panels):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = [(r["tokens"], r["ms"]) for r in rows if (r["phase"], r["group"], r["batch"], r["impl"]) ==
                      (phase, group, batch, impl)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{phase}, G={group}, B={batch}")
        ax.set_xlabel("prompt tokens" if phase == "prefill" else "context")
        ax.grid(alpha=0.3)
        ax.set_ylabel("ms" if phase == "prefill" else "ms per token")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"NSA layer inference, {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
