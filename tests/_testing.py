"""Shared test helpers: one comparator with one tolerance table, and input factories."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

# Allowed relative RMS error of a kernel against the float64 reference computed on the same inputs.
RATIO = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Relative RMS error <= ratio, identical NaN/inf pattern, same shape. Reports max abs error."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{name}: output has NaN"
    assert torch.equal(torch.isinf(ref64), torch.isinf(out64)), f"{name}: inf pattern differs from the reference"
    finite = torch.isfinite(ref64)
    assert torch.equal(ref64[~finite], out64[~finite]), f"{name}: infinite values differ in sign"
    diff = (ref64 - out64)[finite]
    if diff.numel() == 0:
        return
    rms_err = diff.pow(2).mean().sqrt().item()
    rms_ref = ref64[finite].pow(2).mean().sqrt().item()
    max_abs = diff.abs().max().item()
    assert rms_err <= ratio * max(rms_ref, 1e-6), (
        f"{name}: relative RMS error {rms_err / max(rms_ref, 1e-6):.3e} > {ratio:.1e} (max abs error {max_abs:.3e})"
    )


def make_qkv(batch, num_queries, num_keys, hq, hkv, d, dv=None, dtype=torch.float32, device=DEVICE):
    """Random q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] that require grad."""
    dv = d if dv is None else dv
    q = torch.randn(batch, num_queries, hq, d, dtype=dtype, device=device)
    k = torch.randn(batch, num_keys, hkv, d, dtype=dtype, device=device)
    v = torch.randn(batch, num_keys, hkv, dv, dtype=dtype, device=device)
    return [x.requires_grad_() for x in (q, k, v)]


def make_cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def make_indices(batch, num_queries, num_keys, hkv, block_size, topk, cu_seqlens=None, device=DEVICE,
                 cu_seqlens_k=None):
    """Valid random selections: ascending causal blocks of each query's sequence, -1 padded, own block often in."""
    out = torch.full((batch, num_queries, hkv, topk), -1, dtype=torch.int32)
    for b in range(batch):
        if cu_seqlens is None:
            spans = [(0, num_queries, num_keys - num_queries)]
        else:
            bounds = cu_seqlens.tolist()
            keys = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
            spans = [(s, e, (ke - ks) - (e - s)) for s, e, ks, ke in zip(bounds[:-1], bounds[1:], keys[:-1], keys[1:])]
        for start, end, offset in spans:
            for i in range(start, end):
                last = (i - start + offset) // block_size
                for h in range(hkv):
                    count = int(torch.randint(1, topk + 1, ()))
                    chosen = torch.randperm(last + 1)[:count]
                    if torch.rand(()) < 0.7:  # usually include the query's own (partly future) block
                        chosen = torch.unique(torch.cat([chosen[: count - 1], torch.tensor([last])]))
                    chosen = chosen.sort().values
                    out[b, i, h, : len(chosen)] = chosen.to(torch.int32)
    return out.to(device)


def to_reference(*tensors):
    """float64 detached copies that require grad (the oracle's inputs)."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def grads(outputs, inputs, cotangents):
    """Gradients of sum(out * cotangent) over the finite entries of each output."""
    loss = 0
    for out, cot in zip(outputs, cotangents):
        out = out.double() if out.dtype != torch.float64 else out
        loss = loss + (out.masked_fill(~torch.isfinite(out), 0) * cot.to(out.device, torch.float64)).sum()
    return torch.autograd.grad(loss, inputs)


class Case(NamedTuple):
    batch: int
    num_queries: int
    num_keys: int
    hq: int
    hkv: int
    d: int
    dv: int
    lengths: tuple[int, ...] | None = None  # packed sequences (cu_seqlens), batch == 1

    @property
    def id(self) -> str:
        varlen = f"-varlen{'_'.join(map(str, self.lengths))}" if self.lengths else ""
        return f"B{self.batch}-Tq{self.num_queries}-Tk{self.num_keys}-Hq{self.hq}-Hkv{self.hkv}-D{self.d}-Dv{self.dv}{varlen}"

    def inputs(self, dtype, device=DEVICE):
        cu = None if self.lengths is None else make_cu_seqlens(self.lengths, device)
        return (*make_qkv(self.batch, self.num_queries, self.num_keys, self.hq, self.hkv, self.d, self.dv,
                          dtype, device), cu)


# Small shapes for CPU CI: G in {1, 2, 4, 8}, D in {16, 64, 96, 128}, odd T, varlen (with an empty
# sequence), a separate value head dim, and fewer queries than keys.
SMALL_CASES = [
    Case(2, 63, 63, 2, 2, 16, 16),
    Case(1, 100, 100, 4, 2, 64, 64),
    Case(2, 130, 130, 4, 1, 96, 96),
    Case(1, 77, 77, 8, 1, 128, 128),
    Case(1, 161, 161, 4, 2, 64, 48, (33, 0, 67, 61)),
    Case(2, 37, 100, 4, 2, 32, 32),
]

# The same coverage at sizes a GPU handles (run with -m gpu).
LARGE_CASES = [
    Case(1, 2047, 2047, 4, 4, 128, 128),
    Case(2, 1000, 1000, 8, 2, 64, 64),
    Case(1, 3001, 3001, 8, 1, 96, 96, (1000, 1, 2000)),
    Case(1, 1024, 2048, 16, 2, 128, 128),
]


def case_params(small_dtypes=(torch.float32, torch.float16), large_dtypes=(torch.bfloat16,)):
    """pytest params: every small case in the CPU dtypes, every large case (marked gpu) in the GPU dtypes."""
    import pytest

    small = [pytest.param(c, dt, id=f"{c.id}-{str(dt)[6:]}") for c in SMALL_CASES for dt in small_dtypes]
    large = [
        pytest.param(c, dt, id=f"{c.id}-{str(dt)[6:]}", marks=pytest.mark.gpu)
        for c in LARGE_CASES for dt in large_dtypes
    ]
    return small + large


def check_attention(op_out, ref_fn, inputs, dtype):
    """Compare (o, lse) and (dq, dk, dv) of an op against the float64 reference on the same inputs.

    ``ref_fn(q, k, v) -> (o, lse)`` runs the oracle; ``inputs`` are the op's (q, k, v) that require grad.
    """
    o, lse = op_out
    ref_inputs = to_reference(*inputs)
    ref_o, ref_lse = ref_fn(*ref_inputs)
    assert o.dtype == inputs[0].dtype and o.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("o", ref_o, o, RATIO[dtype])
    assert_close("lse", ref_lse, lse, RATIO[dtype])
    do = torch.randn_like(ref_o)
    dlse = torch.randn_like(ref_lse)
    got = grads((o, lse), inputs, (do, dlse))
    want = grads((ref_o, ref_lse), ref_inputs, (do, dlse))
    for name, ref_grad, grad, x in zip(("dq", "dk", "dv"), want, got, inputs):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_close(name, ref_grad, grad, RATIO[dtype])


@contextlib.contextmanager
def cpu_kernel_disabled(*ops):
    """Switch off the PyTorch CPU kernel of ``ops``: CPU tensors then run the Triton kernels (interpreter)."""
    with contextlib.ExitStack() as stack:
        for op in ops:
            stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` inside the block, the previous mode restored after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# Kernel paths of the attention ops: "torch" is the PyTorch CPU kernel, "triton" the Triton kernels (on CPU
# tensors under TRITON_INTERPRET=1). selected_attention has two Triton kernels, "fsa" and "nsa".
ATTENTION_PATHS = ("torch", "triton") if DEVICE == "cpu" else ("triton",)
SELECTED_PATHS = (("torch", "fsa", "nsa") if DEVICE == "cpu" else ("fsa", "nsa"))


@contextlib.contextmanager
def attention_path(path: str, *ops):
    """Run ``ops`` (an op and its backward op, if it has one) through ``path`` ("torch" or "triton")."""
    if path == "torch" or DEVICE != "cpu":
        yield
        return
    with cpu_kernel_disabled(*ops):
        yield


@contextlib.contextmanager
def selected_attention_path(path: str):
    """Run ``torch.ops.fsa.selected_attention`` through ``path``; yields the ``impl=`` value to pass."""
    from fsa_compile.ops.selected_attention import selected_attention, selected_attention_backward  # the op objects

    with attention_path("torch" if path == "torch" else "triton", selected_attention, selected_attention_backward):
        yield "auto" if path == "torch" else path


def check_on_query_suffix(o, lse, inputs, ref_fn, tail: int) -> None:
    """Realistic-size check against the float64 oracle run on the last ``tail`` queries only.

    ``o, lse`` come from the op on ``inputs`` (q, k, v requiring grad); ``ref_fn(q_suffix, k, v) -> (o, lse)``.
    The loss is put on the suffix rows, so every gradient (dk, dv included) must match the oracle's.
    """
    do = torch.zeros_like(o)
    do[:, -tail:] = torch.randn_like(o[:, -tail:])
    grads = torch.autograd.grad(o, inputs, do)
    rq, rk, rv = (x.detach().double().requires_grad_() for x in inputs)
    ref_o, ref_lse = ref_fn(rq[:, -tail:], rk, rv)
    ref_grads = torch.autograd.grad(ref_o, (rq, rk, rv), do[:, -tail:].double())
    ratio = RATIO[o.dtype]
    assert_close("o", ref_o, o[:, -tail:], ratio)
    assert_close("lse", ref_lse, lse[:, -tail:], ratio)
    for name, ref_grad, grad in zip(("dq", "dk", "dv"), ref_grads, grads):
        assert_close(name, ref_grad, grad, ratio)


def make_layer(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, **config):
    """A FlashSparseAttention on DEVICE whose parameters all matter (moved away from the mean-pooling start)."""
    import fsa_compile

    layer = fsa_compile.FlashSparseAttention(hidden_size, num_heads, num_kv_heads, head_dim, **config)
    layer = layer.to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def make_small_layer(**overrides):
    """A small FlashSparseAttention (hidden 64, Hq 4, Hkv 2, D 16) whose parameters all matter."""
    config = dict(kernel_size=8, kernel_stride=4, block_size=8, topk=3, init_blocks=1, local_blocks=1, window_size=16)
    return make_layer(**(config | overrides))


def fresh_compiled_glue(monkeypatch) -> None:
    """The setting compiled_glue as a test needs it: its device rule widened to CPU (so that CI compares the compiled
    functions with eager ones), and fresh compiled functions with Dynamo reset, so that the graphs a test counts do
    not depend on the signatures that earlier tests used up."""
    from fsa_compile import _compiled_glue, functional, modules

    monkeypatch.setattr(_compiled_glue, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(modules, "_project_compiled", _compiled_glue.compiled(modules._project))
    monkeypatch.setattr(functional, "_combine_compiled", _compiled_glue.compiled(functional._combine))
    torch._dynamo.reset()
