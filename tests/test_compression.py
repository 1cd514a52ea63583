import pytest
import torch

from fsa_compile import compress, reference
from fsa_compile.compression import rotary_embedding, rotary_embeddings
from tests._testing import make_cu_seqlens


@pytest.mark.parametrize("kernel_size,kernel_stride", [(8, 4), (16, 16), (32, 16), (5, 3)])
@pytest.mark.parametrize("lengths", [None, (30, 0, 7, 64)], ids=["dense", "varlen"])
def test_compress_matches_reference(kernel_size, kernel_stride, lengths):
    total = 101 if lengths is None else sum(lengths)
    batch = 2 if lengths is None else 1
    cu = None if lengths is None else make_cu_seqlens(lengths, "cpu")
    x = torch.randn(batch, total, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, kernel_size * 6, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(3, kernel_size, 6, dtype=torch.float64, requires_grad=True)
    out = compress(x, weight, pos, kernel_size, kernel_stride, cu)
    want = reference.compress(x, weight, pos, kernel_size, kernel_stride, cu)
    torch.testing.assert_close(out, want)
    cot = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad((out * cot).sum(), (x, weight, pos)), torch.autograd.grad((want * cot).sum(), (x, weight, pos))
    )


def test_short_input_gives_no_windows():
    x = torch.randn(1, 5, 2, 4)
    assert compress(x, torch.randn(2, 32, 4), torch.zeros(2, 8, 4), 8, 4).shape == (1, 0, 2, 4)


def test_rotary_matches_reference():
    x = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    positions = torch.arange(9)
    torch.testing.assert_close(rotary_embedding(x, positions, 500.0), reference.rotary_embedding(x, positions[None], 500.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_in_16_bit_rounds_once(dtype):
    """Computed in float32 and rounded once: within half an ulp of the float64 result, plus the float32 error of
    the angles (about 1e-4 at position 1000)."""
    x = torch.randn(2, 50, 3, 16, dtype=dtype)
    positions = torch.arange(1000, 1050)
    want = reference.rotary_embedding(x.double(), positions[None], 10000.0)
    got = rotary_embedding(x, positions, 10000.0)
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((got.double() - want).abs() <= 0.5 * ulp + 2e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_of_several_tensors_equals_one_at_a_time(dtype):
    """q and k through one shared cos/sin table: bitwise each rotated alone, forward and backward."""
    q = torch.randn(2, 21, 4, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 21, 2, 16, dtype=dtype, requires_grad=True)
    positions = torch.randint(0, 4000, (2, 21))
    together = rotary_embeddings((q, k), positions, 500.0)
    alone = [rotary_embedding(x, positions, 500.0) for x in (q, k)]
    grads = [torch.randn_like(t) for t in alone]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(together, (q, k), grads),
                                                  torch.autograd.grad(alone, (q, k), grads)))
