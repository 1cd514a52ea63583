"""examples/generate.py: generation through the KV cache equals generation by full forwards; a train.py checkpoint
answers its retrieval queries through the cache as the full forward does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fsa_compile.models import ModelConfig, NSAConfig, Transformer
from tests._testing import DEVICE
from tests.test_train import TINY, train

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = generate
_spec.loader.exec_module(generate)


def small_model(dtype=torch.float64):
    nsa = NSAConfig(kernel_size=8, kernel_stride=4, block_size=8, topk=3, init_blocks=1, local_blocks=1,
                    window_size=12)
    config = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, nsa=nsa)
    return Transformer(config, device=DEVICE, dtype=dtype).eval()


@torch.no_grad()
def test_cached_generation_equals_full_forwards():
    model = small_model()
    prompt = torch.randint(0, 40, (2, 37), device=DEVICE)
    new, timings = generate.generate(model, prompt, 20)
    sequence = prompt
    for _ in range(20):  # greedy by recomputing the whole sequence every step
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, sequence[:, 37:])
    assert timings["prefill_tokens_per_s"] > 0 and timings["decode_tokens_per_s"] > 0


def test_sampling_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(200, 1)
    picked = generate.sample_next(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(picked.flatten().tolist()) == {1, 2}
    assert generate.sample_next(logits, 0.0, None).flatten().tolist() == [1] * 200


def test_random_model_main_runs(capsys):
    result = generate.main(["--device", "cpu", "--prompt-len", "40", "--new-tokens", "5", "--batch", "2"])
    assert result["prefill_tokens_per_s"] > 0
    assert "decode" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--new-tokens", "0"], ["--temperature", "-1"], ["--top-k", "0"]])
def test_bad_flags_exit_with_a_message(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--device", "cpu", *flags])
    assert exit_info.value.code == 2 and "must be" in capsys.readouterr().err


def test_checkpoint_answers_retrieval_queries_as_the_full_forward(tmp_path):
    """A few training steps, then the retrieval accuracy through the cache (token by token up to each query key)
    equals the greedy accuracy of the full forward on the same held-out samples."""
    train.main([*TINY, "--steps", "3", "--out", str(tmp_path)])
    model, args, train_module = generate.load_checkpoint(tmp_path, torch.device("cpu"))
    cached = generate.answer_retrieval(model, args, train_module, 6, torch.device("cpu"))
    task = train_module.task_of(args)
    tokens, targets = task.batch(args.seed + train_module.EVAL_SEED_OFFSET, range(6))
    with torch.no_grad():
        predicted = model(tokens).argmax(-1)
    scored = targets != -100
    assert cached == pytest.approx((predicted[scored] == targets[scored]).double().mean().item(), abs=1e-12)
