"""The whole FlashSparseAttention layer vs the same layer with full causal SDPA, measured in one run.

    python benchmarks/bench_layer.py                                  # T in {8K, 32K, 64K, 128K}, G in {1, 4}
    python benchmarks/bench_layer.py --seqlens 8192 65536 --groups 1 --compile-seqlens 8192 --out bench_out
    python benchmarks/bench_layer.py --seqlens 32768 65536 --compile-seqlens 32768 65536 --shapes static \
        --no-cudagraphs --no-compiled-breakdown                       # the compiled layer only: fewer compiles
    python benchmarks/bench_layer.py --set compiled_glue=true ...     # a launch setting for the whole run

Per (T, G), bf16, Hkv = 4, D = 128, hidden = Hq * D, batch 1, defaults of the layer (kernel 32/16, block 64,
top-16, window 512):
- layer forward and forward+backward (ms, median) for NSA eager and the dense-SDPA layer (eager), peak memory;
  forward+backward also 10 steps back to back (steady state: where a step is host-bound, one step after an L2
  flush overstates it), for the compiled variants too;
- a per-branch breakdown on the layer's own intermediates: projections+compression, compressed attention,
  select_blocks, selected attention, window attention (forward and forward+backward), eager and (for
  ``--compile-seqlens``) each branch compiled; the compressed branch also on the Triton kernel alone (the cuDNN
  regrouping switched off), for the A/B;
- for ``--compile-seqlens``: NSA compiled (``torch.compile(fullgraph=True)``, static shapes, where Inductor
  launches the ops' Triton kernels itself, and ``dynamic=True``, where the ops stay opaque calls), each also with
  CUDA graphs (``mode="reduce-overhead"``), and the CUDA kernels launched per forward+backward.
Prints a table, writes JSON and a PNG plot; the card is in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402
from fsa_compile.models import FullCausalAttention  # noqa: E402
from fsa_compile.ops import _settings as settings  # noqa: E402
from _harness import back_to_back_ms, cuda_time_ms, device_meta, peak_memory_mb, write_json  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the [bench] extra
    def tqdm(iterable, **_):
        return iterable


def dense_causal_layer(layer: fsa_compile.FlashSparseAttention) -> FullCausalAttention:
    """The NSA layer's own q/k/v/o projections and RoPE around full causal SDPA (no compression, gates, selection)."""
    dense = FullCausalAttention(layer.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.rope_theta)
    dense.q_proj, dense.k_proj, dense.v_proj, dense.o_proj = layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj
    return dense


def forward_backward(model, x, grad):
    def run():
        x.grad = None
        model(x).backward(grad)
    return run


def forward_only(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def branch_times(layer, x, compiled: bool = False) -> dict:
    """ms per branch, forward and forward+backward, on the layer's own intermediates; ``compiled``: each branch
    through ``torch.compile(fullgraph=True)`` (static shapes)."""
    L = layer
    with torch.no_grad():
        inputs = L.project(x)
    q, k, v, k_cmp, v_cmp = (inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "k_cmp", "v_cmp"))
    o_cmp, lse_cmp = fsa_compile.compressed_attention(q, k_cmp, v_cmp, L.kernel_size, L.kernel_stride)
    indices = fsa_compile.select_blocks(q, k_cmp, lse_cmp, L.kernel_size, L.kernel_stride, L.block_size, L.topk,
                                        L.init_blocks, L.local_blocks)
    branches = {
        "project+compress": lambda: L.project(x),
        "compressed": lambda: fsa_compile.compressed_attention(q, k_cmp, v_cmp, L.kernel_size, L.kernel_stride),
        # Timed inside one override of the setting (a change of settings drops the ops' eager CUDA graphs).
        "compressed (Triton)": lambda: fsa_compile.compressed_attention(q, k_cmp, v_cmp, L.kernel_size,
                                                                        L.kernel_stride),
        "select": lambda: fsa_compile.select_blocks(q, k_cmp, lse_cmp, L.kernel_size, L.kernel_stride,
                                                    L.block_size, L.topk, L.init_blocks, L.local_blocks),
        "selected": lambda: fsa_compile.selected_attention(q, k, v, indices, L.block_size),
        "window": lambda: fsa_compile.sliding_window_attention(q, k, v, L.window_size),
    }
    out = {}
    for name, fn in branches.items():
        if compiled and name == "compressed (Triton)":
            continue  # the setting is read while tracing
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True)
        triton_only = name == "compressed (Triton)"
        with settings.override("compressed_dense", None) if triton_only else contextlib.nullcontext():
            with torch.no_grad():
                out[f"{name} fwd"] = cuda_time_ms(fn)
            if name != "select":  # not differentiable
                def full(fn=fn):
                    result = fn()
                    # As in the layer: an attention branch's o gets a gradient, its lse none (a gradient for lse
                    # would also move the compressed backward off cuDNN).
                    outputs = result.values() if isinstance(result, dict) else result[:1]  # (o, lse) -> o
                    sum(t.float().sum() for t in outputs if t.requires_grad).backward()
                out[f"{name} fwd+bwd"] = cuda_time_ms(full)
    return out


def count_cuda_kernels(fn) -> int:
    """CUDA kernels launched by one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_config(seqlen, group, compile_it, args):
    hkv, d = 4, 128
    hq = group * hkv
    layer = fsa_compile.FlashSparseAttention(hq * d, hq, hkv, d, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, seqlen, hq * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    dense = dense_causal_layer(layer)
    row = dict(seqlen=seqlen, group=group, hq=hq, hkv=hkv, head_dim=d)
    for name, model in (("nsa", layer), ("sdpa", dense)):
        row[f"{name} fwd"] = cuda_time_ms(forward_only(model, x))
        row[f"{name} fwd+bwd"] = cuda_time_ms(forward_backward(model, x, grad))
        row[f"{name} fwd+bwd back-to-back"] = back_to_back_ms(forward_backward(model, x, grad))
        row[f"{name} peak MiB"] = peak_memory_mb(forward_backward(model, x, grad))
    row["breakdown"] = branch_times(layer, x)
    if compile_it:
        if args.compiled_breakdown:
            row["breakdown compiled"] = branch_times(layer, x, compiled=True)
        row["kernels eager fwd+bwd"] = count_cuda_kernels(forward_backward(layer, x, grad))
        # static: Inductor launches the ops' Triton kernels itself; dynamic: the ops stay opaque calls.
        for tag in args.shapes:
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, dynamic=tag == "dynamic")
            row[f"nsa compiled {tag} fwd+bwd"] = cuda_time_ms(forward_backward(compiled, x, grad))
            row[f"nsa compiled {tag} fwd+bwd back-to-back"] = back_to_back_ms(forward_backward(compiled, x, grad))
            row[f"kernels compiled {tag} fwd+bwd"] = count_cuda_kernels(forward_backward(compiled, x, grad))
            if args.cudagraphs:
                graphs = torch.compile(layer, fullgraph=True, dynamic=tag == "dynamic", mode="reduce-overhead")
                row[f"nsa cudagraphs {tag} fwd+bwd"] = cuda_time_ms(forward_backward(graphs, x, grad))
    return row


def print_table(rows):
    print(f"\n{'T':>7} {'G':>2}  {'nsa fwd':>9} {'sdpa fwd':>9} {'nsa f+b':>9} {'sdpa f+b':>9} {'speedup':>8} "
          f"{'nsa MiB':>8} {'sdpa MiB':>8}")
    for r in rows:
        print(f"{r['seqlen']:>7} {r['group']:>2}  {r['nsa fwd']:9.2f} {r['sdpa fwd']:9.2f} {r['nsa fwd+bwd']:9.2f} "
              f"{r['sdpa fwd+bwd']:9.2f} {r['sdpa fwd+bwd'] / r['nsa fwd+bwd']:7.2f}x {r['nsa peak MiB']:8.0f} "
              f"{r['sdpa peak MiB']:8.0f}")
    print("\nforward+backward ms, 10 steps back to back (a training loop's steady state: host and GPU overlap)")
    for r in rows:
        sdpa = r["sdpa fwd+bwd back-to-back"]
        nsa = {"eager": r["nsa fwd+bwd back-to-back"]}
        for tag in ("static", "dynamic"):
            if f"nsa compiled {tag} fwd+bwd back-to-back" in r:
                nsa[f"compiled {tag}"] = r[f"nsa compiled {tag} fwd+bwd back-to-back"]
        print(f"  T={r['seqlen']} G={r['group']}: sdpa {sdpa:.2f}  "
              + "  ".join(f"nsa {name} {ms:.2f} ({sdpa / ms:.2f}x)" for name, ms in nsa.items()))
    compiled_rows = [r for r in rows if "kernels eager fwd+bwd" in r]
    if compiled_rows:
        print("\nforward+backward ms (kernels launched): eager vs torch.compile (static / dynamic shapes), "
              "plain and with CUDA graphs")
        for r in compiled_rows:
            parts = []
            for tag in ("static", "dynamic"):
                compiled, graphs = r.get(f"nsa compiled {tag} fwd+bwd"), r.get(f"nsa cudagraphs {tag} fwd+bwd")
                if compiled is None:
                    continue
                parts.append(f"{tag}: compiled {compiled:.2f} ({r[f'kernels compiled {tag} fwd+bwd']}) "
                             f"speedup vs sdpa {r['sdpa fwd+bwd'] / compiled:.2f}x"
                             + ("" if graphs is None else f" cudagraphs {graphs:.2f}"))
            parts = "  ".join(parts)
            print(f"  T={r['seqlen']} G={r['group']}: eager {r['nsa fwd+bwd']:.2f} ({r['kernels eager fwd+bwd']})  "
                  f"{parts}")
    for key in ("breakdown", "breakdown compiled"):
        if not any(key in r for r in rows):
            continue
        print(f"\n{key} (ms):")
        for r in rows:
            if key in r:
                parts = "  ".join(f"{k} {v:.2f}" for k, v in r[key].items())
                print(f"  T={r['seqlen']} G={r['group']}: {parts}")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in sorted({r["group"] for r in rows}):
        sub = [r for r in rows if r["group"] == group]
        seqlens = [r["seqlen"] for r in sub]
        ax.plot(seqlens, [r["nsa fwd+bwd"] for r in sub], "o-", label=f"NSA layer (FSA) G={group}")
        ax.plot(seqlens, [r["sdpa fwd+bwd"] for r in sub], "s--", label=f"SDPA layer G={group}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("forward+backward ms")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--compile-seqlens", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--shapes", nargs="+", choices=("static", "dynamic"), default=["static", "dynamic"],
                        help="compiled variants measured for --compile-seqlens")
    parser.add_argument("--cudagraphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also each compiled variant with CUDA graphs (mode='reduce-overhead')")
    parser.add_argument("--compiled-breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="also the per-branch breakdown compiled")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                        help="a launch setting of ops/_settings.py for the whole run, e.g. compiled_glue=true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer.py needs a CUDA device")
    overrides = {name: json.loads(value) for name, _, value in (a.partition("=") for a in args.set)}
    for name, value in overrides.items():
        settings.replace(name, value)
    meta = {**device_meta(), "settings": overrides}
    configs = [(t, g) for g in args.groups for t in args.seqlens]
    rows = []
    for seqlen, group in tqdm(configs, desc="configs"):
        rows.append(run_config(seqlen, group, seqlen in args.compile_seqlens, args))
        write_json(args.out / "bench_layer.json", rows, meta)  # each row kept as it comes
        torch.cuda.empty_cache()
    print(meta["device"], *(f"{name}={value}" for name, value in overrides.items()))
    print_table(rows)
    plot(rows, args.out / "bench_layer.png")


if __name__ == "__main__":
    main()
