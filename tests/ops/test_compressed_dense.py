"""Compressed attention as dense causal attention over regrouped queries (``ops/_compressed_dense.py``).

On CPU the regrouping runs around a plain PyTorch causal attention (float64, exact); on a GPU around cuDNN, through
the op itself, against the reference.
"""

import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops import _compressed_dense as dense
from fsa_compile.ops import _settings
from tests._testing import RATIO, assert_close, deterministic_algorithms, grads, make_qkv, to_reference


def plain_attention(q, k, v, scale):
    """Causal attention q [B, Hq, S, D], k, v [B, Hkv, S, D] -> o, lse [B, Hq, S, 1] (what cuDNN returns)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(
        torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return torch.exp(scores - lse) @ v, lse


def plain_attention_backward(do, q, k, v, o, lse, scale):
    """The flash-attention backward from the saved lse (as cuDNN's), dk and dv summed over each group."""
    group = q.shape[1] // k.shape[1]
    kg, vg = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ kg.transpose(-1, -2) * scale).masked_fill(
        torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(scores - lse)
    ds = p * (do @ vg.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dk = (ds.transpose(-1, -2) @ q * scale).unflatten(1, (k.shape[1], group)).sum(2)
    dv = (p.transpose(-1, -2) @ do).unflatten(1, (k.shape[1], group)).sum(2)
    return ds @ kg * scale, dk, dv


@pytest.mark.parametrize("num_tokens", [32, 47, 48, 100, 133])
@pytest.mark.parametrize("group,kernel_size,kernel_stride,extra_rows", [(1, 32, 16, 0), (3, 32, 16, 2), (2, 16, 8, 1),
                                                                        (1, 7, 3, 0), (2, 8, 8, 0)])
def test_regrouped_attention_is_the_op(num_tokens, group, kernel_size, kernel_stride, extra_rows):
    """float64: forward and backward of the regrouping around a plain causal attention equal the
    reference (to the float64 tolerance); odd T (padding queries), k_cmp with rows past Tc (zero gradients there)."""
    hkv, d = 2, 8
    num_rows = (num_tokens - kernel_size) // kernel_stride + 1
    q, k_cmp, v_cmp = make_qkv(2, num_tokens, num_rows + extra_rows, hkv * group, hkv, d, dtype=torch.float64,
                               device="cpu")
    scale = d ** -0.5
    o, lse = dense.forward(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, attention=plain_attention)
    ref_inputs = to_reference(q, k_cmp, v_cmp)
    ref_o, ref_lse = reference.compressed_attention(*ref_inputs, kernel_size, kernel_stride)
    assert_close("o", ref_o, o, 1e-9)
    assert_close("lse", ref_lse, lse, 1e-9)
    do = torch.randn_like(o)
    got = dense.backward(do, q, k_cmp, v_cmp, o, lse, kernel_size, kernel_stride, scale,
                         attention_backward=plain_attention_backward)
    want = grads((ref_o,), ref_inputs, (do,))
    for name, g, w in zip(("dq", "dk_cmp", "dv_cmp"), got, want):
        assert_close(name, w, g, 1e-9)
    assert torch.equal(got[1][:, num_rows:], torch.zeros_like(got[1][:, num_rows:]))


def test_applies_only_where_cudnn_runs_it():
    shapes = ((1, 4096, 4, 64), (1, 255, 4, 64), (1, 255, 4, 64))
    q, k_cmp, v_cmp = (torch.empty(shape, dtype=torch.bfloat16) for shape in shapes)
    assert not dense.applies(q, k_cmp, v_cmp, 32, 16, None, None, None, None)  # CPU
    if not torch.cuda.is_available():
        return
    q, k_cmp, v_cmp = (x.cuda() for x in (q, k_cmp, v_cmp))
    assert dense.applies(q, k_cmp, v_cmp, 32, 16, None, None, None, None)
    cu = torch.tensor([0, 4096], dtype=torch.int32, device="cuda")
    assert not dense.applies(q, k_cmp, v_cmp, 32, 16, cu, None, None, None)
    assert not dense.applies(q, k_cmp, v_cmp, 32, 16, None, 8192, None, None)
    assert not dense.applies(q.float(), k_cmp.float(), v_cmp.float(), 32, 16, None, None, None, None)
    with _settings.override("compressed_dense", None):
        assert not dense.applies(q, k_cmp, v_cmp, 32, 16, None, None, None, None)
    wide = torch.empty(1, 4096, 64, 64, dtype=torch.bfloat16, device="cuda")  # G = 16 below min_tokens
    assert not dense.applies(wide, k_cmp, v_cmp, 32, 16, None, None, None, None)


GPU_SHAPES = [(1, 4096, 1, 128, 32, 16), (2, 1000, 4, 64, 32, 16), (1, 3001, 8, 128, 32, 16),
              (1, 777, 16, 64, 16, 8), (1, 4096, 2, 128, 64, 32)]


def check_output_gradients(q, k_cmp, v_cmp, kernel_size, kernel_stride, dtype, tail=None):
    """o, lse and the gradients of a loss on o alone (the backward the dense path takes) against the reference,
    on the last ``tail`` queries (all by default)."""
    o, lse = fsa_compile.compressed_attention(q, k_cmp, v_cmp, kernel_size, kernel_stride)
    tail = tail or q.shape[1]
    do = torch.zeros_like(o)
    do[:, -tail:] = torch.randn_like(o[:, -tail:])
    got = torch.autograd.grad(o, (q, k_cmp, v_cmp), do)
    ref_inputs = to_reference(q, k_cmp, v_cmp)
    ref_o, ref_lse = reference.compressed_attention(ref_inputs[0][:, -tail:], *ref_inputs[1:], kernel_size,
                                                    kernel_stride, None, None, q.shape[1])
    want = torch.autograd.grad(ref_o, ref_inputs, do[:, -tail:].double())
    assert_close("o", ref_o, o[:, -tail:], RATIO[dtype])
    assert_close("lse", ref_lse, lse[:, -tail:], RATIO[dtype])
    for name, w, g in zip(("dq", "dk_cmp", "dv_cmp"), want, got):
        assert_close(name, w, g, RATIO[dtype])
    return o, lse, got


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch,num_tokens,group,d,kernel_size,kernel_stride", GPU_SHAPES,
                         ids=lambda x: str(x))
def test_cudnn_path_matches_reference(batch, num_tokens, group, d, kernel_size, kernel_stride, dtype):
    hkv = 2
    num_rows = (num_tokens - kernel_size) // kernel_stride + 1
    q, k_cmp, v_cmp = make_qkv(batch, num_tokens, num_rows, hkv * group, hkv, d, dtype=dtype)
    with _settings.override("compressed_dense", dict(max_group=64, min_tokens=0)):
        assert dense.applies(q, k_cmp, v_cmp, kernel_size, kernel_stride, None, None, None, None)
        check_output_gradients(q, k_cmp, v_cmp, kernel_size, kernel_stride, dtype)


@pytest.mark.gpu
def test_cudnn_path_at_32k_with_padded_compressed_rows():
    """T = 32K, G = 1, bf16 (the dense path by default), loss on the last 256 queries; k_cmp with 2 rows past Tc."""
    num_tokens, hkv = 32768, 4
    num_rows = (num_tokens - 32) // 16 + 1
    q, k_cmp, v_cmp = make_qkv(1, num_tokens, num_rows + 2, hkv, hkv, 128, dtype=torch.bfloat16)
    assert dense.applies(q, k_cmp, v_cmp, 32, 16, None, None, None, None)
    o, lse, (_, dk, _) = check_output_gradients(q, k_cmp, v_cmp, 32, 16, torch.bfloat16, tail=256)
    assert torch.equal(dk[:, num_rows:], torch.zeros_like(dk[:, num_rows:]))
    with _settings.override("compressed_dense", None):  # the Triton kernel agrees
        o_triton, lse_triton = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 32, 16)
    assert_close("o vs triton", o_triton, o, 1e-2)
    assert_close("lse vs triton", lse_triton, lse, 1e-5)


@pytest.mark.gpu
def test_dense_ops_pass_opcheck():
    q, k_cmp, v_cmp = make_qkv(2, 300, 17, 8, 2, 64, dtype=torch.bfloat16)
    o, lse = dense.forward_op(q, k_cmp, v_cmp, 32, 16, 0.125)
    # No autograd of their own: the compressed_attention op's autograd calls them.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(dense.forward_op, (q, k_cmp, v_cmp, 32, 16, 0.125), test_utils=utils)
    torch.library.opcheck(dense.backward_op, (torch.randn_like(o), q, k_cmp, v_cmp, o, lse, 32, 16, 0.125),
                          test_utils=utils)


@pytest.mark.gpu
def test_compiled_cudnn_path_matches_eager():
    """Compiled (static shapes: Inductor traces the op's CUDA path) at G = 4, 8K, where the regrouping traced into
    the graph crashed Inductor 2.11's tiling analysis; forward equal to eager's, gradients close (cuDNN's backward
    accumulates in a nondeterministic order)."""
    q, k_cmp, v_cmp = make_qkv(1, 8192, 511, 16, 4, 128, dtype=torch.bfloat16)
    assert dense.applies(q, k_cmp, v_cmp, 32, 16, None, None, None, None)
    do = torch.randn_like(q)

    def run(fn):
        inputs = [x.detach().requires_grad_() for x in (q, k_cmp, v_cmp)]
        o, lse = fn(*inputs, 32, 16)
        return (o, lse, *torch.autograd.grad(o, inputs, do))  # no lse gradient: the backward stays on cuDNN

    torch._dynamo.reset()
    compiled = run(torch.compile(fsa_compile.compressed_attention, fullgraph=True))
    eager = run(fsa_compile.compressed_attention)
    for name, want, got in zip(("o", "lse"), eager, compiled):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    for name, want, got in zip(("dq", "dk_cmp", "dv_cmp"), eager[2:], compiled[2:]):
        assert_close(name, want, got, 1e-2)


@pytest.mark.gpu
def test_deterministic_algorithms_take_the_triton_backward(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward skips cuDNN (its dq order varies run to run):
    two backwards are bitwise identical."""
    q, k_cmp, v_cmp = make_qkv(1, 4096, 255, 4, 4, 128, dtype=torch.bfloat16)
    assert dense.applies(q, k_cmp, v_cmp, 32, 16, None, None, None, None)
    do = torch.randn_like(q)

    def cudnn_backward(*args):
        raise AssertionError("the cuDNN backward ran under deterministic algorithms")

    monkeypatch.setattr(dense, "backward_op", cudnn_backward)
    with deterministic_algorithms():
        grads_twice = []
        for _ in range(2):
            inputs = [x.detach().requires_grad_() for x in (q, k_cmp, v_cmp)]
            o, _ = fsa_compile.compressed_attention(*inputs, 32, 16)
            grads_twice.append(torch.autograd.grad(o, inputs, do))
    for first, second in zip(*grads_twice):
        assert torch.equal(first, second)
