"""fsa::rotary_embedding: both paths against the float64 reference, forward and backward; the layer with it."""

import pytest
import torch

from fsa_compile import reference
from fsa_compile.ops import _settings
from fsa_compile.ops.rotary_embedding import rotary_embedding as rope_op
from tests._testing import DEVICE, RATIO, assert_close, cpu_kernel_disabled, make_layer

PATHS = ("torch", "triton") if DEVICE == "cpu" else ("triton",)


def _rope(x, positions, path, inverse=False):
    if path == "triton" and DEVICE == "cpu":
        with cpu_kernel_disabled(rope_op):
            return rope_op(x, positions, 500.0, inverse)
    return rope_op(x, positions, 500.0, inverse)


def _inputs(batch, num_tokens, heads, dim, dtype, per_batch, strided):
    base = torch.randn(batch, num_tokens, heads + 2, dim, dtype=dtype, device=DEVICE)
    x = (base[:, :, 1 : heads + 1] if strided else base[:, :, :heads].contiguous()).requires_grad_()
    positions = torch.randint(0, 3 * num_tokens, (batch, num_tokens) if per_batch else (num_tokens,), device=DEVICE)
    return x, positions


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,num_tokens,heads,dim,per_batch,strided", [
    (2, 7, 3, 10, False, False),  # half = 5: not a power of two
    (1, 33, 4, 64, True, True),  # per-row positions (packed/caches), a strided view like the fused projection's q
    pytest.param(2, 2049, 8, 128, True, True, marks=pytest.mark.gpu),
])
def test_matches_reference_forward_and_backward(path, dtype, batch, num_tokens, heads, dim, per_batch, strided):
    x, positions = _inputs(batch, num_tokens, heads, dim, dtype, per_batch, strided)
    out = _rope(x, positions, path)
    ref_x = x.detach().double().requires_grad_()
    ref = reference.rotary_embedding(ref_x, positions if per_batch else positions[None], 500.0)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_close("out", ref, out, RATIO[dtype])
    grad = torch.randn_like(ref)
    (dx,) = torch.autograd.grad(out, x, grad.to(dtype))
    (ref_dx,) = torch.autograd.grad(ref, ref_x, grad)
    assert_close("dx", ref_dx, dx, RATIO[dtype])


@pytest.mark.parametrize("path", PATHS)
def test_inverse_undoes_the_rotation(path):
    x, positions = _inputs(2, 19, 2, 12, torch.float32, True, False)
    back = _rope(_rope(x, positions, path), positions, path, inverse=True)
    assert_close("x", x, back, RATIO[torch.float32])


def test_gradcheck():
    x, positions = _inputs(1, 5, 2, 6, torch.float64, False, False)
    torch.autograd.gradcheck(lambda x: rope_op(x, positions, 100.0), (x,))


@pytest.mark.parametrize("x_shape,positions,error,message", [
    ((1, 4, 2, 7), torch.arange(4), ValueError, "head dim D=x.shape\\[3\\] must be even"),
    ((1, 4, 2, 8), torch.arange(5), ValueError, "positions must be \\[T\\]=\\[4\\] or \\[B, T\\]"),
    ((1, 4, 2, 8), torch.arange(4.0), TypeError, "positions must be an int32 or int64 tensor, got torch.float32"),
    ((4, 2, 8), torch.arange(4), ValueError, "x must be 4-D"),
])
def test_bad_input_is_refused(x_shape, positions, error, message):
    with pytest.raises(error, match=message):
        rope_op(torch.randn(x_shape, device=DEVICE), positions.to(DEVICE), 10000.0)


def test_bad_theta_is_refused():
    with pytest.raises(ValueError, match="theta must be > 0, got 0.0"):
        rope_op(torch.randn(1, 4, 2, 8, device=DEVICE), torch.arange(4, device=DEVICE), 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the layer calls the op on CUDA only")
def test_layer_with_fused_rope_matches_the_plain_layer():
    layer = make_layer(512, 4, 2, 128, dtype=torch.bfloat16)
    x = torch.randn(1, 2048, 512, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(x)
        return (out, *torch.autograd.grad(out, (x, *layer.parameters()), torch.ones_like(out)))

    want = step()
    with _settings.override("fused_rope", True):
        got = step()
    for index, (a, b) in enumerate(zip(want, got, strict=True)):
        assert_close(f"output {index}", a, b, 1e-2)
