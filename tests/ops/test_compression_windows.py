"""torch.ops.fsa.compression_windows: the plain gather + position embedding it replaces, forward and backward."""

import pytest
import torch

from fsa_compile.ops import SequenceLayout
from tests._testing import DEVICE, assert_close


def windows_inputs(batch, num_tokens, heads, dim, kernel_size, kernel_stride, dtype=torch.float64):
    layout = SequenceLayout(batch, num_tokens, num_tokens, DEVICE)
    first, _, _ = layout.compressed_rows(kernel_size, kernel_stride, num_tokens // kernel_stride + 2)
    tokens = (first[:, None] + torch.arange(kernel_size, device=DEVICE)).clamp(max=max(num_tokens - 1, 0))
    x = torch.randn(batch, num_tokens, heads, dim, dtype=dtype, device=DEVICE, requires_grad=True)
    pos_emb = torch.randn(heads, kernel_size, dim, dtype=dtype, device=DEVICE, requires_grad=True)
    return x, tokens, pos_emb


@pytest.mark.parametrize("batch,num_tokens,heads,dim,kernel_size,kernel_stride",
                         [(2, 50, 2, 8, 8, 4), (1, 3, 1, 4, 8, 4), (1, 40, 3, 5, 5, 5)],
                         ids=["overlapping", "shorter-than-a-window", "disjoint"])
def test_matches_the_plain_gather(batch, num_tokens, heads, dim, kernel_size, kernel_stride):
    x, tokens, pos_emb = windows_inputs(batch, num_tokens, heads, dim, kernel_size, kernel_stride)
    out = torch.ops.fsa.compression_windows(x, tokens, pos_emb)
    want = (x[:, tokens] + pos_emb.transpose(0, 1)).permute(0, 3, 1, 2, 4).flatten(3)
    assert_close("windows", want, out, 1e-12)
    cot = torch.randn_like(out)
    for name, got, expected in zip(("dx", "dpos_emb"), torch.autograd.grad(out, (x, pos_emb), cot),
                                   torch.autograd.grad(want, (x, pos_emb), cot)):
        assert_close(name, expected, got, 1e-12)


def test_opcheck():
    x, tokens, pos_emb = windows_inputs(2, 37, 2, 8, 8, 4, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fsa.compression_windows.default, (x, tokens, pos_emb))
    mixed = pos_emb.detach().double().requires_grad_()  # promotes like x + pos_emb
    assert torch.ops.fsa.compression_windows(x, tokens, mixed).dtype == torch.float64
