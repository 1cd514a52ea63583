"""Train a Llama-style decoder with NSA attention on a long-range retrieval task (the main job).

    python examples/train.py                                   # the small default: CPU, or the GPU when there is one
    python examples/train.py --steps 1200 --resume             # continue the default run to step 1200
    python examples/train.py --device cuda --seq-len 32768 --layers 4 --hidden 1024 --heads 8 --kv-heads 8 \\
        --batch-tokens 65536 --steps 200 --attention nsa --impl fsa --block-size 64 --topk 16 --window 512
    torchrun --nproc-per-node 2 examples/train.py              # DDP (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 2 examples/train.py --fsdp       # FSDP2 (fully_shard), distributed checkpoints

The task (generated on the fly, deterministic per seed and sample index): a context of random filler tokens in
which ``--pairs`` (key, value) token pairs are scattered, then a query marker followed by ``--queries`` of those
keys, each followed by its value. The model is scored on predicting each value from its key at the end: to do it,
attention must find the key's first occurrence far outside the sliding window. Chance is 1 / ``--values``. The
default, one pair, is passkey retrieval (find the one far-away value); with ``--pairs`` > 1 the model must also
match the asked key, which takes many more steps (with 4 pairs, 3000 GPU steps of the default model got no further
than copying a value of the context, 1 / pairs).

Every ``--checkpoint-every`` steps and at the end it saves model, optimizer, scheduler, RNG states, step and the
metric history under ``--out``/checkpoints; ``--resume`` continues from the latest one (``--steps`` is the total,
and resuming reproduces the losses of an uninterrupted run). At the end it measures retrieval accuracy on
held-out samples and writes ``metrics.json`` and ``training.png`` (loss and accuracy per step) under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fsa_compile
from fsa_compile.models import ModelConfig, NSAConfig, Transformer


# ----------------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class RetrievalTask:
    """Key/value pairs scattered through filler; the last ``2 * queries`` tokens ask for some of them.

    Vocabulary: filler ``[0, filler)``, keys ``[filler, filler + keys)``, values after them, then one query
    marker. A sample is ``seq_len`` tokens; ``targets`` is -100 except at the query keys, where it holds the
    value (the next token)."""

    seq_len: int
    pairs: int = 1
    queries: int = 1
    keys: int = 8
    values: int = 32
    filler: int = 64

    @property
    def vocab_size(self) -> int:
        return self.filler + self.keys + self.values + 1

    @property
    def query_marker(self) -> int:
        return self.vocab_size - 1

    @property
    def min_seq_len(self) -> int:
        return 2 * self.pairs + 2 * self.queries + 2

    @property
    def chance(self) -> float:
        return 1.0 / self.values

    @property
    def copy_baseline(self) -> float:
        """Accuracy of copying one of the context's values without matching the key (at most 1 / pairs)."""
        return 1.0 / self.pairs

    def check(self) -> None:
        if self.pairs > self.keys:
            raise ValueError(f"--pairs={self.pairs} needs that many distinct keys, got --keys={self.keys}")
        if self.queries > self.pairs:
            raise ValueError(f"--queries={self.queries} must be <= --pairs={self.pairs}")
        if self.seq_len < self.min_seq_len:
            raise ValueError(
                f"--seq-len={self.seq_len} is below the task's minimum 2 * pairs + 2 * queries + 2 = {self.min_seq_len}"
            )

    def sample(self, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), int64 [seq_len] each, a pure function of (seed, index)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        tokens = torch.randint(0, self.filler, (self.seq_len,), generator=generator)
        keys = self.filler + torch.randperm(self.keys, generator=generator)[: self.pairs]
        values = self.filler + self.keys + torch.randint(0, self.values, (self.pairs,), generator=generator)
        # Pairs go to distinct even slots of the context so that no two overlap.
        context = self.seq_len - 2 * self.queries - 1
        slots = torch.randperm(context // 2, generator=generator)[: self.pairs] * 2
        tokens[slots], tokens[slots + 1] = keys, values
        tokens[context] = self.query_marker
        asked = torch.randperm(self.pairs, generator=generator)[: self.queries]
        query_keys = context + 1 + 2 * torch.arange(self.queries)
        tokens[query_keys], tokens[query_keys + 1] = keys[asked], values[asked]
        targets = torch.full_like(tokens, -100)
        targets[query_keys] = values[asked]
        return tokens, targets

    def batch(self, seed: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [self.sample(seed, int(i)) for i in indices]
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


EVAL_SEED_OFFSET = 7919  # held-out samples come from another seed stream


# ----------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    run.add_argument("--steps", type=int, default=700, help="total optimizer steps (also when resuming)")
    run.add_argument("--batch-tokens", type=int, default=4096, help="tokens per optimizer step, all ranks together")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="runs/train", help="checkpoints, metrics.json and training.png go here")
    run.add_argument("--checkpoint-every", type=int, default=200, help="0: only at the end")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile each block (fullgraph). Default: on CUDA only")
    run.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    run.add_argument("--packed", action="store_true", help="feed each rank's batch as one packed row + cu_seqlens")
    run.add_argument("--eval-samples", type=int, default=256, help="held-out samples for the final accuracy")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs every 50 steps instead)")
    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--warmup", type=int, default=50, help="linear warmup steps; then a constant lr")
    optim.add_argument("--decay-steps", type=int, default=0,
                       help="cosine decay to 10%% of --lr at this step (0: none); independent of --steps, so a "
                            "resumed run follows the same schedule")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--grad-clip", type=float, default=1.0)
    model = parser.add_argument_group("model")
    model.add_argument("--attention", choices=("nsa", "full"), default="nsa")
    model.add_argument("--impl", choices=("auto", "fsa", "nsa"), default="auto", help="selected-attention kernel")
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--hidden", type=int, default=128)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    model.add_argument("--kernel-size", type=int, default=16)
    model.add_argument("--kernel-stride", type=int, default=8)
    model.add_argument("--block-size", type=int, default=16)
    model.add_argument("--topk", type=int, default=4)
    model.add_argument("--init-blocks", type=int, default=1)
    model.add_argument("--local-blocks", type=int, default=1)
    model.add_argument("--window", type=int, default=32)
    task = parser.add_argument_group("task")
    task.add_argument("--seq-len", type=int, default=256)
    task.add_argument("--pairs", type=int, default=1, help="key/value pairs in the context")
    task.add_argument("--queries", type=int, default=1, help="of those pairs, how many are asked at the end")
    task.add_argument("--keys", type=int, default=8, help="distinct key tokens")
    task.add_argument("--values", type=int, default=32, help="distinct value tokens (chance = 1 / values)")
    return parser


def check_args(args, world_size: int) -> None:
    """Raise ValueError for impossible combinations, before any work."""
    positive = ("steps", "batch_tokens", "layers", "hidden", "heads", "kv_heads", "seq_len", "kernel_size",
                "kernel_stride", "block_size", "topk", "window", "pairs", "queries", "keys", "values", "eval_samples")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.heads % args.kv_heads != 0:
        raise ValueError(f"--kv-heads={args.kv_heads} does not divide --heads={args.heads}")
    if args.head_dim is None and args.hidden % args.heads != 0:
        raise ValueError(f"--heads={args.heads} does not divide --hidden={args.hidden}; pass --head-dim")
    if args.init_blocks + args.local_blocks > args.topk:
        raise ValueError(f"--init-blocks + --local-blocks must be <= --topk, got "
                         f"{args.init_blocks} + {args.local_blocks} > {args.topk}")
    if args.kernel_stride > args.kernel_size:
        raise ValueError(f"--kernel-stride={args.kernel_stride} must be <= --kernel-size={args.kernel_size}")
    sequences = args.batch_tokens // args.seq_len
    if args.batch_tokens % args.seq_len != 0 or sequences % world_size != 0:
        raise ValueError(f"--batch-tokens={args.batch_tokens} must be a multiple of --seq-len * world size = "
                         f"{args.seq_len} * {world_size}")
    if args.packed and args.attention == "full" and args.seq_len * sequences // world_size > 16384:
        raise ValueError("--packed with --attention full builds a [T, T] mask: use at most 16384 tokens per rank")
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    task_of(args).check()


def task_of(args) -> RetrievalTask:
    return RetrievalTask(args.seq_len, args.pairs, args.queries, args.keys, args.values)


def model_config(args) -> ModelConfig:
    nsa = NSAConfig(args.kernel_size, args.kernel_stride, args.block_size, args.topk, args.init_blocks,
                    args.local_blocks, args.window, args.impl)
    return ModelConfig(vocab_size=task_of(args).vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                       attention=args.attention, nsa=nsa)


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_runtime(device_name: str | None) -> Runtime:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo on CPU)."""
    cuda = torch.cuda.is_available() if device_name is None else device_name == "cuda"
    if "RANK" not in os.environ:
        return Runtime(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def parallelize(model: Transformer, runtime: Runtime, fsdp: bool, compile_blocks: bool):
    """Compile each block (fullgraph), then wrap: FSDP2 per block and at the root, or DDP."""
    if compile_blocks:
        for block in model.layers:
            block.compile(fullgraph=True)
    if not runtime.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # An explicit mesh: fully_shard's default one is on the accelerator, even for --device cpu on a GPU host.
        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def all_mean(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / runtime.world_size
    return values


# ----------------------------------------------------------------------------------------------- checkpoints
def _latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step_*"))
    complete = [s for s in steps if (s / "done").exists()]
    return complete[-1] if complete else None


@contextlib.contextmanager
def _quiet_single_process_dcp():
    """In one process dcp.save/load warn on every call that they assume one process; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, history, args, runtime: Runtime) -> Path:
    """Model and optimizer as a distributed checkpoint (sharded under FSDP2), the rest per rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = out / "checkpoints" / f"step_{step:07d}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _quiet_single_process_dcp():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path),
                 no_dist=not runtime.distributed)
    extra = {
        "step": step, "scheduler": scheduler.state_dict(), "history": history, "args": vars(args),
        "next_sample": step * (args.batch_tokens // args.seq_len),  # data position: step s reads samples from s * batch
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None,
    }
    torch.save(extra, path / f"extra_rank{runtime.rank}.pt")
    if runtime.distributed:
        dist.barrier()
    if runtime.main:
        (path / "done").touch()
    return path


# Flags a resumed run must share with its checkpoint: they fix the model's shapes and which samples each step reads.
RESUME_MUST_MATCH = ("seed", "batch_tokens", "seq_len", "pairs", "queries", "keys", "values", "attention", "layers",
                     "hidden", "heads", "kv_heads", "head_dim", "kernel_size", "kernel_stride", "block_size", "topk",
                     "init_blocks", "local_blocks", "window")


def load_checkpoint(path: Path, model, optimizer, scheduler, args, runtime: Runtime) -> tuple[int, dict]:
    """Restore everything ``save_checkpoint`` wrote; -> (step, history). Raises ValueError when a flag in
    ``RESUME_MUST_MATCH`` differs from the checkpoint's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extra_path = path / f"extra_rank{runtime.rank}.pt"
    if not extra_path.exists():  # more ranks than the run that saved it: RNG states of rank 0
        extra_path = path / "extra_rank0.pt"
    extra = torch.load(extra_path, weights_only=False)
    for name in RESUME_MUST_MATCH:
        if extra["args"][name] != getattr(args, name):
            raise ValueError(f"--resume: --{name.replace('_', '-')}={getattr(args, name)} differs from the "
                             f"checkpoint's {extra['args'][name]} ({path})")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _quiet_single_process_dcp():
        dcp.load(state, checkpoint_id=str(path), no_dist=not runtime.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra["rng_cuda"] is not None and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng_cuda"], runtime.device)
    return extra["step"], extra["history"]


# ----------------------------------------------------------------------------------------------- training
def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.decay_steps <= args.warmup:
            return 1.0
        progress = min(1.0, (step - args.warmup) / (args.decay_steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def model_inputs(tokens: torch.Tensor, packed: bool):
    """[B, T] -> (tokens, cu_seqlens): unchanged, or one packed row [1, B*T] with int32 cu_seqlens."""
    if not packed:
        return tokens, None
    batch, seq_len = tokens.shape
    cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=tokens.device)
    return tokens.reshape(1, -1), cu_seqlens


def loss_and_accuracy(model, tokens, targets, packed: bool, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast():
        logits = model(*model_inputs(tokens, packed)).view(*tokens.shape, -1)
    scored = targets != -100
    picked = logits[scored].float()
    loss = F.cross_entropy(picked, targets[scored])
    accuracy = (picked.argmax(-1) == targets[scored]).float().mean()
    return loss, accuracy


@torch.no_grad()
def evaluate(model, task: RetrievalTask, args, runtime: Runtime, autocast) -> float:
    """Retrieval accuracy (greedy, at every query key) on held-out samples, split over ranks.

    Every rank runs the same number of samples (``eval_samples`` rounded up to a multiple of the world size), so
    that FSDP2's collectives line up."""
    model.eval()
    per_rank = math.ceil(args.eval_samples / runtime.world_size)
    indices = range(runtime.rank * per_rank, (runtime.rank + 1) * per_rank)
    batch = max(1, args.batch_tokens // args.seq_len // runtime.world_size)
    correct = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # (right, asked)
    for start in range(indices.start, indices.stop, batch):
        chunk = range(start, min(start + batch, indices.stop))
        tokens, targets = (t.to(runtime.device) for t in task.batch(args.seed + EVAL_SEED_OFFSET, chunk))
        _, accuracy = loss_and_accuracy(model, tokens, targets, args.packed, autocast)
        asked = (targets != -100).sum()
        correct += torch.stack([accuracy.double() * asked, asked.double()])
    if runtime.distributed:
        dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


def plot_history(history: dict, chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(history["step"], history["loss"], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="loss (value tokens)", title="training loss")
    ax_loss.axhline(math.log(1 / chance), color="gray", ls=":", label="log(values): uniform guess")
    ax_loss.legend()
    ax_acc.plot(history["step"], history["accuracy"], lw=0.8, label="train batch")
    ax_acc.axhline(chance, color="gray", ls=":", label=f"chance {chance:.3f}")
    ax_acc.set(xlabel="step", ylabel="retrieval accuracy", title="retrieval accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args, runtime: Runtime) -> dict:
    """Run (or resume) training; returns the metrics written to metrics.json (on every rank)."""
    task = task_of(args)
    out = Path(args.out)
    device = runtime.device
    compile_blocks = device.type == "cuda" if args.compile is None else args.compile
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = Transformer(model_config(args), device=device)
    model = parallelize(model, runtime, args.fsdp, compile_blocks)
    optimizer, scheduler = make_optimizer(model, args)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    step, history = 0, {"step": [], "loss": [], "accuracy": [], "tokens_per_s": []}
    if args.resume:
        latest = _latest_checkpoint(out)
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
        step, history = load_checkpoint(latest, model, optimizer, scheduler, args, runtime)
        if runtime.main:
            print(f"resumed from {latest} at step {step}")
    if args.fsdp and not runtime.distributed and runtime.main:
        print("--fsdp: not started by torchrun, so one process without sharding")
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        core = model.module if hasattr(model, "module") else model
        print(f"model: {core.num_parameters() / 1e6:.2f}M parameters, attention={args.attention}, impl={args.impl}, "
              f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}; device {device}, "
              f"world size {runtime.world_size}{', FSDP2' if args.fsdp else ''}, compile={compile_blocks}")
        copying = f", copying a context value without matching its key {task.copy_baseline:.3f}" if args.pairs > 1 else ""
        print(f"task: seq_len {args.seq_len}, {args.pairs} pairs, {args.queries} queries; chance {task.chance:.4f}"
              f"{copying}")

    global_batch = args.batch_tokens // args.seq_len
    per_rank = global_batch // runtime.world_size
    progress = None
    if runtime.main and not args.no_progress and step < args.steps:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    while step < args.steps:
        tick = time.perf_counter()
        first = step * global_batch + runtime.rank * per_rank
        tokens, targets = (t.to(device) for t in task.batch(args.seed, range(first, first + per_rank)))
        loss, accuracy = loss_and_accuracy(model, tokens, targets, args.packed, autocast)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value, accuracy_value = all_mean(torch.stack([loss.detach(), accuracy]).double(), runtime).tolist()
        tokens_per_s = args.batch_tokens / (time.perf_counter() - tick)
        for key, value in zip(history, (step, loss_value, accuracy_value, tokens_per_s)):
            history[key].append(value)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", acc=f"{accuracy_value:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        elif runtime.main and (step % 50 == 0 or step == args.steps):
            print(f"step {step}: loss {loss_value:.4f}, accuracy {accuracy_value:.3f}, {tokens_per_s:,.0f} tokens/s")
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == args.steps:
            save_checkpoint(out, step, model, optimizer, scheduler, history, args, runtime)
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - started

    accuracy = evaluate(model, task, args, runtime, autocast)
    steady = history["tokens_per_s"][len(history["tokens_per_s"]) // 2:]  # skip compile and warm-up steps
    metrics = {
        "eval_accuracy": accuracy, "chance": task.chance, "accuracy_over_chance": accuracy / task.chance,
        "copy_baseline": task.copy_baseline,
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "steps": step, "train_seconds_this_run": elapsed,
        "tokens_per_s_median": sorted(steady)[len(steady) // 2] if steady else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": runtime.world_size, "torch": torch.__version__, "fsa_compile": fsa_compile.__version__,
        "args": vars(args), "model": model_config(args).to_dict(),
    }
    if runtime.main:
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=1))
        plot_history(history, task.chance, out / "training.png")
        print(f"held-out retrieval accuracy {accuracy:.3f} (chance {task.chance:.3f}, {accuracy / task.chance:.1f}x), "
              f"final loss {metrics['final_loss']:.4f}, {elapsed:.0f} s; wrote {out / 'metrics.json'} and "
              f"{out / 'training.png'}")
    return metrics


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        check_args(args, world_size)
    except ValueError as error:
        build_parser().error(str(error))
    runtime = start_runtime(args.device)
    try:
        metrics = train(args, runtime)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing metrics: leave the group together
        return metrics
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
