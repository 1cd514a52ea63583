"""Generate with the NSA decoder and its KV cache: one prefill of the prompt, then one token per step.

    python examples/generate.py                                # a random model, CPU (the GPU when there is one)
    python examples/generate.py --checkpoint runs/train        # train.py's latest checkpoint: answer held-out
                                                               # retrieval queries with the cache
    python examples/generate.py --temperature 0.8 --top-k 20 --new-tokens 64

Prints prefill tokens/s and decode tokens/s. On CUDA the decode step is captured once in a CUDA graph and replayed
(``fsa_compile.CUDAGraphStep``; ``--compile`` compiles it first, ``--no-cuda-graph`` runs it eagerly). With a
checkpoint of ``examples/train.py`` it rebuilds that run's model
and task, feeds each held-out sample up to its query key through the cache and checks the greedy next token against
the value (the accuracy ``train.py`` reports, here computed token by token through ``NSACache``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from fsa_compile import CUDAGraphStep
from fsa_compile.models import ModelConfig, NSAConfig, Transformer


def load_train_module():
    spec = importlib.util.spec_from_file_location("train", Path(__file__).with_name("train.py"))
    train = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train  # dataclasses look their module up there
    spec.loader.exec_module(train)
    return train


def load_checkpoint(out: Path, device):
    """-> (model, train.py's args, the train module) from the latest complete checkpoint under ``out``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    train = load_train_module()
    path = train._latest_checkpoint(Path(out))
    if path is None:
        raise SystemExit(f"--checkpoint: no complete checkpoint under {Path(out) / 'checkpoints'}")
    args = argparse.Namespace(**torch.load(path / "extra_rank0.pt", weights_only=False)["args"])
    model = Transformer(train.model_config(args), device=device)
    state = {"model": get_model_state_dict(model)}
    with train._quiet_single_process_dcp():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, state["model"])
    print(f"loaded {path} (step {path.name.split('_')[-1].lstrip('0') or 0})")
    return model.eval(), args, train


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """[B, vocab] -> [B, 1]: greedy at temperature 0, else sampled from the top_k logits / temperature."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator=None, cuda_graph: bool | None = None,
             compile_step: bool = False) -> tuple[torch.Tensor, dict]:
    """prompt int64 [B, T] -> (the new tokens [B, new_tokens], timings). One prefill call, then one call per token,
    all through one ``NSACache`` per layer; the decode step replayed from a CUDA graph when ``cuda_graph`` (default:
    on CUDA, except for a float64 model: float64 runs the ops' PyTorch paths, which read the cache fills on the host
    and cannot be captured), compiled first with ``compile_step``."""
    batch, prompt_len = prompt.shape
    cache = model.make_cache(batch, prompt_len + new_tokens)
    synchronize = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    token = sample_next(model(prompt, cache=cache)[:, -1], temperature, top_k, generator)
    synchronize()
    prefill_s = time.perf_counter() - start

    def step(tokens):
        return model(tokens, cache=cache)[:, -1]

    capture_s = 0.0
    if cuda_graph is None:
        cuda_graph = prompt.is_cuda and next(model.parameters()).dtype != torch.float64
    if cuda_graph and new_tokens > 1:
        start = time.perf_counter()
        step = CUDAGraphStep(torch.compile(step, dynamic=False) if compile_step else step, cache, token)
        synchronize()
        capture_s = time.perf_counter() - start
    out = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = sample_next(step(token), temperature, top_k, generator)
        out.append(token)
    synchronize()
    decode_s = time.perf_counter() - start
    timings = {"prefill_tokens_per_s": batch * prompt_len / prefill_s,
               "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
               "cuda_graph_capture_s": capture_s}
    return torch.cat(out, dim=1), timings


def answer_retrieval(model, args, train, samples: int, device) -> float:
    """Greedy retrieval accuracy on held-out samples of the checkpoint's task, through the cache."""
    task = train.task_of(args)
    right = asked = 0
    for index in range(samples):
        tokens, targets = task.sample(args.seed + train.EVAL_SEED_OFFSET, index)
        for position in (targets != -100).nonzero().flatten().tolist():
            answer, _ = generate(model, tokens[None, : position + 1].to(device), 1)
            right += int(answer.item() == targets[position].item())
            asked += 1
    return right / asked


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="train.py's --out directory (default: a random model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--prompt-len", type=int, default=512, help="random prompt tokens (random model)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--samples", type=int, default=32, help="held-out retrieval samples (with --checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step before capturing it (CUDA)")
    args = parser.parse_args(argv)
    for name in ("prompt_len", "batch", "new_tokens", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    result = {}
    if args.checkpoint is not None:
        model, train_args, train = load_checkpoint(args.checkpoint, device)
        result["retrieval_accuracy"] = answer_retrieval(model, train_args, train, args.samples, device)
        print(f"held-out retrieval through the cache: {result['retrieval_accuracy']:.1%} of {args.samples} samples "
              f"(chance {train.task_of(train_args).chance:.1%})")
        vocab_size = model.config.vocab_size
    else:
        nsa = NSAConfig(kernel_size=16, kernel_stride=8, block_size=16, topk=4, init_blocks=1, local_blocks=1,
                        window_size=32)
        config = ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, nsa=nsa)
        model, vocab_size = Transformer(config, device=device).eval(), config.vocab_size
    prompt = torch.randint(0, vocab_size, (args.batch, args.prompt_len), device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    new, timings = generate(model, prompt, args.new_tokens, args.temperature, args.top_k, generator,
                            cuda_graph=device.type == "cuda" and not args.no_cuda_graph, compile_step=args.compile)
    result.update(timings)
    print(f"prompt {args.batch} x {args.prompt_len} tokens on {device}: "
          f"prefill {timings['prefill_tokens_per_s']:,.0f} tokens/s, decode {timings['decode_tokens_per_s']:,.0f} tokens/s")
    print("first sequence's new tokens:", new[0].tolist())
    return result


if __name__ == "__main__":
    main()
