"""FSA selected attention in its modes, for A/B runs: forward, backward, and the deterministic backward.

    python benchmarks/bench_selected_modes.py --label new --out bench_out            # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_selected_modes.py --label old --no-deterministic
    python benchmarks/bench_selected_modes.py --compare bench_out/modes_old.json bench_out/modes_new.json

Times the op calls of ``bench_selected.selected_problem`` (bf16, Hkv = 4, D = 128, block 64, top-16, the same
indices for every run of one seed): ``fwd``, ``bwd`` (the backward op, default atomics) and ``bwd_det`` (the
backward under ``torch.use_deterministic_algorithms(True)``). ``--repeat`` runs the whole set several times,
interleaving with other runs of the script made in between; medians go to ``modes_<label>.json``.
``--compare`` prints each mode's ratio (second / first) and the deterministic / default backward ratio, and
draws them to a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SelectedConfig, cuda_time_ms, device_meta  # noqa: E402
from bench_selected import selected_problem  # noqa: E402


def measure(config: SelectedConfig, deterministic: bool) -> dict[str, float]:
    torch.manual_seed(0)
    steps, _ = selected_problem(config, "fsa")
    times = {"fwd": cuda_time_ms(steps["fwd"]), "bwd": cuda_time_ms(steps["bwd"])}
    if deterministic:
        torch.use_deterministic_algorithms(True)
        try:
            times["bwd_det"] = cuda_time_ms(steps["bwd"])
        finally:
            torch.use_deterministic_algorithms(False)
    return times


def run(args) -> None:
    import fsa_compile

    configs = [SelectedConfig(seqlen=t, group=g) for t in args.seqlens for g in args.groups]
    rows = {}
    for _ in range(args.repeat):
        for config in configs:
            key = f"T{config.seqlen}-G{config.group}"
            for mode, ms in measure(config, args.deterministic).items():
                rows.setdefault(key, {}).setdefault(mode, []).append(ms)
    result = {
        "label": args.label, "package": str(Path(fsa_compile.__file__).parent), **device_meta(),
        "ms": {key: {mode: statistics.median(v) for mode, v in modes.items()} for key, modes in rows.items()},
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"modes_{args.label}.json"
    path.write_text(json.dumps(result, indent=1))
    for key, modes in result["ms"].items():
        print(args.label, key, "  ".join(f"{mode} {ms:.3f} ms" for mode, ms in modes.items()))
    print("wrote", path)


def compare(first_path: Path, second_path: Path, out: Path) -> None:
    first, second = (json.loads(p.read_text()) for p in (first_path, second_path))
    device = second.get("device", "?")
    lines = [f"{first['label']} -> {second['label']} on {device} (median ms; ratio second/first)"]
    labels, ratios = [], {}
    for key, modes in second["ms"].items():
        for mode, ms in modes.items():
            if mode in first["ms"].get(key, {}):
                before = first["ms"][key][mode]
                lines.append(f"{key} {mode}: {before:.3f} -> {ms:.3f} ms ({ms / before:.3f}x)")
                ratios.setdefault(f"{mode} {second['label']}/{first['label']}", []).append(ms / before)
        if "bwd_det" in modes:
            lines.append(f"{key} deterministic / default backward: {modes['bwd_det'] / modes['bwd']:.3f}x")
            ratios.setdefault("bwd_det / bwd", []).append(modes["bwd_det"] / modes["bwd"])
        labels.append(key)
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "modes_compare.txt").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(ratios))
    for i, (name, values) in enumerate(ratios.items()):
        ax.bar([x + i * width for x in range(len(values))], values, width, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("time ratio")
    ax.set_title(f"FSA selected attention, {second.get('device', '')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modes_compare.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[65536])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--label", default="new")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("FIRST", "SECOND"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
