"""examples/train.py: the retrieval task, flag errors, exact resume, and DDP / FSDP2 under torchrun (gloo, CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_example", ROOT / "examples" / "train.py")
train = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = train  # dataclasses look their module up there
_spec.loader.exec_module(train)

# A model and task small enough for a few CPU steps per second.
TINY = ["--device", "cpu", "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--seq-len", "96",
        "--batch-tokens", "384", "--pairs", "4", "--queries", "4", "--keys", "16", "--values", "8",
        "--kernel-size", "8", "--kernel-stride", "4", "--block-size", "8", "--topk", "3", "--window", "12",
        "--warmup", "2", "--eval-samples", "8", "--no-progress", "--no-compile"]


def test_task_is_deterministic_and_well_formed():
    task = train.RetrievalTask(seq_len=100, pairs=6, queries=4, keys=10, values=5)
    tokens, targets = task.sample(seed=3, index=17)
    again, _ = task.sample(seed=3, index=17)
    other, _ = task.sample(seed=3, index=18)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)
    assert tokens.shape == targets.shape == (100,) and tokens.max() < task.vocab_size
    asked = (targets != -100).nonzero().flatten()
    assert asked.tolist() == [92, 94, 96, 98]  # the query keys, after the marker at 100 - 2 * 4 - 1
    assert tokens[100 - 2 * 4 - 1] == task.query_marker
    for position in asked.tolist():
        key, value = tokens[position].item(), targets[position].item()
        assert tokens[position + 1] == value
        first = (tokens[: 100 - 2 * 4 - 1] == key).nonzero().flatten()
        assert len(first) == 1 and tokens[first[0] + 1] == value  # the key appears once in the context, then its value
    assert 64 <= tokens[asked].min() and tokens[asked].max() < 64 + 10  # keys after 64 filler tokens
    assert task.chance == 1 / 5


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--heads", "4", "--kv-heads", "3"], "--kv-heads=3 does not divide --heads=4"),
        (["--seq-len", "16", "--batch-tokens", "32"], "--seq-len=16 is below the task's minimum"),
        (["--batch-tokens", "100"], "--batch-tokens=100 must be a multiple of --seq-len"),
        (["--queries", "9", "--pairs", "8"], "--queries=9 must be <= --pairs=8"),
        (["--topk", "2", "--init-blocks", "1", "--local-blocks", "2"], "--init-blocks \\+ --local-blocks"),
        (["--hidden", "30", "--heads", "4"], "--heads=4 does not divide --hidden=30"),
        (["--steps", "0"], "--steps must be positive"),
    ],
)
def test_impossible_flags_fail_before_any_work(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message.replace("\\", "") in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.main([*TINY, "--out", str(tmp_path), "--steps", "2", "--resume"])


def test_resume_with_other_data_or_model_flags_is_an_error(tmp_path):
    train.main([*TINY, "--out", str(tmp_path), "--steps", "2"])
    with pytest.raises(ValueError, match="--batch-tokens=192 differs from the checkpoint's 384"):
        train.main([*TINY, "--out", str(tmp_path), "--steps", "4", "--resume", "--batch-tokens", "192"])
    with pytest.raises(ValueError, match="--hidden=64 differs"):
        train.main([*TINY, "--out", str(tmp_path), "--steps", "4", "--resume", "--hidden", "64"])


@pytest.mark.parametrize("extra", [[], ["--packed", "--decay-steps", "8"]], ids=["batched", "packed-decay"])
def test_resume_is_bitwise_equal_to_one_run(tmp_path, extra):
    """4 steps, then --resume --steps 8, gives the losses of 8 steps in one go, bitwise (CPU)."""
    flags = [*TINY, *extra, "--checkpoint-every", "3"]
    whole = train.main([*flags, "--steps", "8", "--out", str(tmp_path / "whole")])
    train.main([*flags, "--steps", "4", "--out", str(tmp_path / "split")])
    resumed = train.main([*flags, "--steps", "8", "--out", str(tmp_path / "split"), "--resume"])
    history = {name: json.loads((tmp_path / name / "metrics.json").read_text())["history"] for name in ("whole", "split")}
    assert history["split"]["step"] == list(range(1, 9))
    assert history["split"]["loss"] == history["whole"]["loss"]
    assert history["split"]["accuracy"] == history["whole"]["accuracy"]
    assert resumed["eval_accuracy"] == whole["eval_accuracy"]
    checkpoints = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert checkpoints == ["step_0000003", "step_0000004", "step_0000006", "step_0000008"]
    assert (tmp_path / "split" / "training.png").stat().st_size > 0


def test_default_run_learns_a_little(tmp_path):
    """A short run on the tiny task: the loss falls and metrics.json records chance and the held-out accuracy."""
    metrics = train.main([*TINY, "--steps", "40", "--lr", "3e-3", "--out", str(tmp_path)])
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    first, last = sum(history["loss"][:5]) / 5, sum(history["loss"][-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert metrics["chance"] == 1 / 8 and 0 <= metrics["eval_accuracy"] <= 1


def _torchrun(flags, out: Path, nproc: int = 2) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ROOT / "examples" / "train.py"), *flags, "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())["history"]["loss"]


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    """Two gloo ranks, each reading its half of every global batch, train like one process with the whole batch;
    a checkpoint at step 3 resumes under the same parallelism to the same losses."""
    flags = [*TINY, "--steps", "6", "--checkpoint-every", "3", *mode]
    train.main([*flags, "--out", str(tmp_path / "single")])
    single_losses = json.loads((tmp_path / "single" / "metrics.json").read_text())["history"]["loss"]
    losses = _torchrun(flags, tmp_path / "two")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=1e-4, atol=1e-5)
    # Resume the distributed run from step 3 in a fresh directory holding only that checkpoint.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    os.symlink(tmp_path / "two" / "checkpoints" / "step_0000003", resumed_dir / "step_0000003")
    resumed = _torchrun([*flags, "--resume"], tmp_path / "resumed")
    assert resumed == losses
