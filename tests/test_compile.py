"""torch.compile through the ops: no graph breaks, eager numerics, no recompiles when T changes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tests._testing import DEVICE, make_cu_seqlens, make_small_layer


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_no_graph_breaks():
    layer = make_small_layer()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 45, 64, device=DEVICE))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_fullgraph_matches_eager_forward_and_backward(varlen):
    layer = make_small_layer()
    compiled = torch.compile(layer, fullgraph=True)
    cu = make_cu_seqlens((20, 37)) if varlen else None
    x = torch.randn(1 if varlen else 2, 57, 64, device=DEVICE, requires_grad=True)
    out, want = compiled(x, cu), layer(x, cu)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    cot = torch.randn_like(out)
    got = torch.autograd.grad((out * cot).sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad((want * cot).sum(), [x, *layer.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_dynamic_shapes_do_not_recompile():
    layer = make_small_layer()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for num_tokens in (45, 50, 77):
        x = torch.randn(2, num_tokens, 64, device=DEVICE, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        torch.testing.assert_close(out, layer(x), rtol=1e-4, atol=1e-5)
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for T={num_tokens}"


class _Decoder(torch.nn.Module):
    """Two pre-norm blocks of FlashSparseAttention + MLP, as a model would use the layer."""

    def __init__(self):
        super().__init__()
        self.attention = torch.nn.ModuleList([make_small_layer(), make_small_layer()])
        self.mlp = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                                            torch.nn.Linear(128, 64)) for _ in range(2)])
        self.norm = torch.nn.ModuleList([torch.nn.RMSNorm(64) for _ in range(4)])

    def forward(self, x, cu_seqlens=None):
        for i, (attention, mlp) in enumerate(zip(self.attention, self.mlp)):
            x = x + attention(self.norm[2 * i](x), cu_seqlens)
            x = x + mlp(self.norm[2 * i + 1](x))
        return x


def test_decoder_compiles_without_breaks_or_recompiles():
    decoder = _Decoder().to(DEVICE)
    assert torch._dynamo.explain(decoder)(torch.randn(1, 40, 64, device=DEVICE)).graph_break_count == 0
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(decoder, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for lengths in ((40,), (13, 50), (70,)):
        cu = make_cu_seqlens(lengths) if len(lengths) > 1 else None
        x = torch.randn(1, sum(lengths), 64, device=DEVICE, requires_grad=True)
        out = compiled(x, cu)
        torch.testing.assert_close(out, decoder(x, cu), rtol=1e-4, atol=1e-4)
        out.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in decoder.parameters())
        frames = counter.frame_count if frames is None else frames
    # One recompile is allowed for the switch between batched (cu_seqlens=None) and packed inputs.
    assert counter.frame_count <= frames + 1


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_cuda_graphs_match_eager():
    """mode="reduce-overhead" captures the layer in CUDA graphs: no host sync or capture-breaking allocation."""
    layer = make_small_layer()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for step in range(3):  # warm-up, record, replay
        x = torch.randn(2, 64, 64, device=DEVICE, requires_grad=True)
        out = compiled(x)
        want = layer(x)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        (got,) = torch.autograd.grad(out.square().sum(), x)
        (expected,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
