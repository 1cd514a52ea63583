"""End-to-end training throughput on one GPU: the same decoder with impl="fsa", impl="nsa" and full attention.

    python benchmarks/bench_train.py                                   # T in {16K, 32K, 64K}, G in {1, 4}
    python benchmarks/bench_train.py --seqlens 65536 --groups 1 --out bench_out --no-compile

One training step = forward, backward and AdamW (fused) on one sequence of T tokens, bf16 autocast, each decoder
block compiled with ``torch.compile(fullgraph=True)`` (as ``examples/train.py`` does). Per (T, G) and model:
tokens/s (median over timed steps after warm-up), ms per step and peak memory. The model: ``--layers`` blocks,
hidden ``--hidden``, head dim 128, Hq = hidden / 128, Hkv = Hq / G, the NSA layer's defaults (kernel 32/16, block 64,
top-16, window 512), vocabulary 32000. "full" is the same projections and RoPE around causal SDPA (PyTorch picks
cuDNN or flash). With ``--breakdown`` it also profiles one step per model at the largest T and splits the CUDA
time into the NSA ops' kernels, SDPA, matmuls and the rest. Prints a table, writes JSON and a PNG plot; the card
is in the JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import device_meta, write_json  # noqa: E402
from fsa_compile.models import ModelConfig, NSAConfig, Transformer  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the [bench] extra
    def tqdm(iterable, **_):
        return iterable

MODELS = {"fsa": ("nsa", "fsa"), "nsa": ("nsa", "nsa"), "full": ("full", "auto")}  # name: (attention, impl)
HEAD_DIM = 128


def build(name: str, seqlen: int, group: int, args) -> tuple[Transformer, torch.optim.Optimizer]:
    attention, impl = MODELS[name]
    num_heads = args.hidden // HEAD_DIM
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=num_heads, num_kv_heads=num_heads // group, head_dim=HEAD_DIM,
                         attention=attention, nsa=NSAConfig(impl=impl))
    torch.manual_seed(0)
    model = Transformer(config, device="cuda")
    if args.compile:
        for block in model.layers:
            block.compile(fullgraph=True)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def training_step(model, optimizer, tokens):
    with torch.autocast("cuda", torch.bfloat16):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


KERNEL_GROUPS = (  # (group, substrings of CUDA kernel names), first match wins
    ("selected attention", ("_selected_attention", "_selection_keys", "_invert", "_fsa_")),
    ("compressed + window attention", ("_masked_attention",)),
    ("select_blocks", ("_select_blocks",)),
    ("SDPA", ("flash", "fmha", "cudnn", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "sm100_")),
)


def breakdown(step) -> dict:
    """CUDA ms of one step by kernel group."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    groups = {name: 0.0 for name, _ in KERNEL_GROUPS} | {"other": 0.0}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k.lower() in name for k in keys)), "other")
        groups[group] += event.self_device_time_total / 1e3
    return groups


def run(args, save) -> list[dict]:
    """Every configuration in turn; ``save(rows)`` after each, so a run cut short keeps what it measured."""
    rows = []
    configs = [(t, g, m) for g in args.groups for t in args.seqlens for m in args.models]
    for seqlen, group, name in tqdm(configs, desc="bench_train"):
        torch._dynamo.reset()
        model, optimizer = build(name, seqlen, group, args)
        tokens = torch.randint(0, args.vocab, (1, seqlen + 1), device="cuda")
        step = lambda: training_step(model, optimizer, tokens)  # noqa: E731
        torch.cuda.reset_peak_memory_stats()
        try:
            times = time_steps(step, args.warmup, args.steps)
        except torch.OutOfMemoryError:
            rows.append(dict(seqlen=seqlen, group=group, model=name, error="out of memory"))
            save(rows)
            continue
        ms = statistics.median(times)
        row = dict(seqlen=seqlen, group=group, model=name, ms=ms, tokens_per_s=seqlen / ms * 1e3,
                   peak_mib=torch.cuda.max_memory_allocated() / 2**20, step_ms=times,
                   parameters=model.num_parameters())
        if args.breakdown and seqlen == max(args.seqlens):
            row["cuda_ms_by_kernel_group"] = breakdown(step)
        rows.append(row)
        save(rows)
        print(f"T={seqlen} G={group} {name}: {ms:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
              f"peak {row['peak_mib']:.0f} MiB", flush=True)
        del model, optimizer
        torch.cuda.empty_cache()
    return rows


def print_table(rows) -> None:
    by_key = {(r["seqlen"], r["group"], r["model"]): r for r in rows if "ms" in r}
    print(f"\n{'T':>6} {'G':>2} {'fsa tok/s':>10} {'nsa tok/s':>10} {'full tok/s':>10} {'fsa/nsa':>8} "
          f"{'fsa/full':>9} {'fsa MiB':>8} {'nsa MiB':>8} {'full MiB':>8}")
    for seqlen, group in sorted({(r["seqlen"], r["group"]) for r in rows}, key=lambda k: (k[1], k[0])):
        got = {m: by_key.get((seqlen, group, m)) for m in MODELS}
        speed = {m: (r["tokens_per_s"] if r else float("nan")) for m, r in got.items()}
        mem = {m: (r["peak_mib"] if r else float("nan")) for m, r in got.items()}
        print(f"{seqlen:>6} {group:>2} {speed['fsa']:>10,.0f} {speed['nsa']:>10,.0f} {speed['full']:>10,.0f} "
              f"{speed['fsa'] / speed['nsa']:>7.2f}x {speed['fsa'] / speed['full']:>8.2f}x "
              f"{mem['fsa']:>8.0f} {mem['nsa']:>8.0f} {mem['full']:>8.0f}")
    for r in rows:
        if "cuda_ms_by_kernel_group" in r:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["cuda_ms_by_kernel_group"].items())
            print(f"CUDA ms per step, T={r['seqlen']} G={r['group']} {r['model']}: {parts}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for name, style in zip(MODELS, ("o-", "s--", "^:")):
            sub = sorted((r for r in rows if r["group"] == group and r["model"] == name and "ms" in r),
                         key=lambda r: r["seqlen"])
            ax.plot([r["seqlen"] for r in sub], [r["tokens_per_s"] for r in sub], style, label=name)
        ax.set(xscale="log", xlabel="context T (tokens)", ylabel="training tokens/s", title=f"G = {group}")
        ax.set_xticks(sorted({r["seqlen"] for r in rows}), [f"{t // 1024}K" for t in sorted({r["seqlen"] for r in rows})])
        ax.legend()
    fig.suptitle(f"{torch.cuda.get_device_name()}: training step (fwd+bwd+AdamW), bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--breakdown", action="store_true", help="profile one step per model at the largest T")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="bench_train")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA device")
    out = Path(args.out)
    meta = device_meta() | {"args": vars(args)}
    rows = run(args, lambda rows: write_json(out / f"{args.name}.json", rows, meta))
    print_table(rows)
    plot([r for r in rows if "ms" in r], out / f"{args.name}.png")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')} ({meta['device']})")


if __name__ == "__main__":
    main()
