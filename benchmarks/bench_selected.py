"""Selected attention: FSA vs the in-project vanilla NSA kernel vs dense causal SDPA, measured in one run.

    python benchmarks/bench_selected.py                       # T in {8K, 32K, 64K, 128K}, G in {1, 2, 4, 8, 16}
    python benchmarks/bench_selected.py --seqlens 65536 --groups 1 4 --out bench_out

Reports ms (median), TFLOP/s on useful FLOPs (DESIGN.md: fwd = 4*T*Hq*topk*block_size*D, bwd = 2.5x) and
peak memory, for modes fwd / bwd / full, bf16, Hkv = 4, D = 128, block 64, topk 16; every provider uses
the same indices. Writes JSON and a PNG plot; the card is in the JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsa_compile  # noqa: E402,F401
from _harness import SelectedConfig, as_dict, cuda_time_ms, device_meta, peak_memory_mb, write_json  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the [bench] extra; fall back to plain iteration
    def tqdm(iterable, **_):
        return iterable


def make_indices(config: SelectedConfig, device, chunk: int = 4096) -> torch.Tensor:
    """Realistic selections: block 0 and the two blocks ending at the query's own, then random causal blocks."""
    T, hkv, bs, topk = config.seqlen, config.num_kv_heads, config.block_size, config.topk
    num_blocks = -(-T // bs)
    out = torch.empty(config.batch, T, hkv, topk, dtype=torch.int32, device=device)
    blocks = torch.arange(num_blocks, device=device)
    for start in range(0, T, chunk):
        t = torch.arange(start, min(start + chunk, T), device=device)
        last = (t // bs).view(-1, 1, 1)
        score = torch.rand(len(t), hkv, num_blocks, device=device)
        score = torch.where((blocks == 0) | (blocks == last) | (blocks == last - 1), 2.0, score)
        score = score.masked_fill(blocks > last, -1.0)
        value, chosen = score.topk(topk, dim=-1)
        chosen = torch.where(value < 0, num_blocks, chosen).sort(-1).values
        out[:, start : start + len(t)] = torch.where(chosen == num_blocks, -1, chosen).to(torch.int32)
    return out


def selected_problem(config: SelectedConfig, impl: str = "fsa", device="cuda"):
    """The op's raw calls on bf16 inputs of ``config``: {"fwd": ..., "bwd": ...} (the backward op on the forward's
    o, lse and a random do), for the profiling and tuning scripts. -> (steps, (q, k, v, indices, o, lse, do))."""
    B, T, hq, hkv, D = config.batch, config.seqlen, config.num_heads, config.num_kv_heads, config.head_dim
    q = torch.randn(B, T, hq, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, hkv, D, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    indices = make_indices(config, device)
    o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, config.block_size, None, None, impl)
    do = torch.randn_like(o)
    steps = {
        "fwd": lambda: torch.ops.fsa.selected_attention(q, k, v, indices, config.block_size, None, None, impl),
        "bwd": lambda: torch.ops.fsa.selected_attention_backward(
            do, None, q, k, v, o, lse, indices, config.block_size, None, None, impl),
    }
    return steps, (q, k, v, indices, o, lse, do)


def providers(config: SelectedConfig, device):
    B, T, hq, hkv, D = config.batch, config.seqlen, config.num_heads, config.num_kv_heads, config.head_dim
    dtype = torch.bfloat16
    q = torch.randn(B, T, hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, hkv, D, device=device, dtype=dtype, requires_grad=True)
    indices = make_indices(config, device)

    def selected(impl):
        return lambda: torch.ops.fsa.selected_attention(q, k, v, indices, config.block_size, None, None, impl)[0]

    out = {"fsa": (selected("fsa"), (q, k, v)), "nsa": (selected("nsa"), (q, k, v)), "auto": (selected("auto"), (q, k, v))}
    qt = q.detach().transpose(1, 2).requires_grad_()
    kt = k.detach().transpose(1, 2).repeat_interleave(config.group, 1).requires_grad_()
    vt = v.detach().transpose(1, 2).repeat_interleave(config.group, 1).requires_grad_()
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        out[name] = (dense, (qt, kt, vt))
    return out


def verify(device) -> None:
    """Before timing anything: both kernels against the float64 oracle (forward and gradients), bf16, T=1000."""
    from fsa_compile import reference

    for group in (1, 4):
        config = SelectedConfig(seqlen=1000, group=group, num_kv_heads=2)
        q, k, v = (torch.randn(1, 1000, h, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for h in (config.num_heads, 2, 2))
        indices = make_indices(config, device)
        ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref_o, _ = reference.selected_attention(*ref_inputs, indices, config.block_size)
        do = torch.randn_like(ref_o)
        want = [ref_o, *torch.autograd.grad(ref_o, ref_inputs, do)]
        for impl in ("fsa", "nsa"):
            o, _ = torch.ops.fsa.selected_attention(q, k, v, indices, config.block_size, None, None, impl)
            got = [o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype))]
            for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
                error = (g.double() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
                if not error < 3e-2:
                    raise SystemExit(f"{impl} G={group} {name}: relative RMS error {error:.2e} vs the reference")
    print("verified fsa and nsa against the reference (bf16, T=1000, G=1 and 4)")


def measure(fn, inputs, mode: str) -> tuple[float, float]:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
        return cuda_time_ms(run), peak_memory_mb(run)
    o = fn()
    do = torch.randn_like(o)
    if mode == "bwd":
        def run():
            torch.autograd.grad(o, inputs, do, retain_graph=True)
        return cuda_time_ms(run), peak_memory_mb(run)

    def run():
        torch.autograd.grad(fn(), inputs, do)
    return cuda_time_ms(run), peak_memory_mb(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "full"])
    parser.add_argument("--providers", nargs="+", default=["fsa", "nsa", "auto", "sdpa_flash", "sdpa_cudnn"])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--skip-verify", action="store_true", help="time without checking the kernels first")
    args = parser.parse_args()
    device = torch.device("cuda")
    if not args.skip_verify:
        verify(device)
    rows = []
    configs = [SelectedConfig(seqlen=t, group=g) for t in args.seqlens for g in args.groups]
    for config in tqdm(configs, desc="configs"):
        provider_fns = providers(config, device)
        for mode in args.modes:
            for name in args.providers:
                fn, inputs = provider_fns[name]
                try:
                    ms, mem = measure(fn, inputs, mode)
                except torch.OutOfMemoryError:
                    ms, mem = float("nan"), float("nan")
                flops = config.dense_causal_flops(mode) if name.startswith("sdpa") else config.selected_flops(mode)
                rows.append(as_dict(config) | {"provider": name, "mode": mode, "ms": ms, "tflops": flops / ms / 1e9,
                                               "peak_mb": mem})
                torch.cuda.empty_cache()
        del provider_fns
        torch.cuda.empty_cache()
        write_json(args.out / "bench_selected.json", rows, device_meta())  # partial results survive a timeout
    meta = device_meta()
    print_table(rows, meta)
    plot(rows, args.out / "bench_selected.png", meta)


def print_table(rows, meta) -> None:
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  bf16 Hkv=4 D=128 block=64 topk=16")
    header = f"{'T':>7} {'G':>3} {'mode':>5} " + " ".join(f"{p:>21}" for p in dict.fromkeys(r["provider"] for r in rows))
    print(header + "   fsa/nsa  fsa/cudnn")
    keys = dict.fromkeys((r["seqlen"], r["group"], r["mode"]) for r in rows)
    for t, g, mode in keys:
        sel = {r["provider"]: r for r in rows if (r["seqlen"], r["group"], r["mode"]) == (t, g, mode)}
        cells = " ".join(f"{r['ms']:8.3f}ms {r['tflops']:6.1f}TF/s" for r in sel.values())
        ratio = sel["nsa"]["ms"] / sel["fsa"]["ms"] if "nsa" in sel and "fsa" in sel else float("nan")
        dense = sel["sdpa_cudnn"]["ms"] / sel["fsa"]["ms"] if "sdpa_cudnn" in sel and "fsa" in sel else float("nan")
        print(f"{t:>7} {g:>3} {mode:>5} {cells}   {ratio:6.2f}x  {dense:7.2f}x")


def plot(rows, path: Path, meta) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(groups), figsize=(4 * len(groups), 3.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, g in enumerate(groups):
            ax = axes[i][j]
            for provider in dict.fromkeys(r["provider"] for r in rows):
                pts = [(r["seqlen"], r["ms"]) for r in rows if (r["mode"], r["group"], r["provider"]) == (mode, g, provider)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{mode}, G={g}")
            ax.set_xlabel("T")
            ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"selected attention, {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
