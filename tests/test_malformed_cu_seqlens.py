"""Malformed cu_seqlens on the kernel paths: no out-of-bounds read (the CUDA context survives), finite results,
and the next well-formed call is right. The CPU kernels read the values and raise instead (test_validation.py);
here CPU tensors run the Triton kernels under the interpreter, so CI covers the same clamping as the GPU."""

import pytest
import torch

from fsa_compile.ops.compressed_attention import compressed_attention, compressed_attention_backward
from fsa_compile.ops.select_blocks import select_blocks
from fsa_compile.ops.selected_attention import selected_attention, selected_attention_backward
from fsa_compile.ops.sliding_window_attention import sliding_window_attention, sliding_window_attention_backward
from tests._testing import DEVICE, assert_close, cpu_kernel_disabled, make_cu_seqlens, make_small_layer

T = 64
MALFORMED = {
    "negative": [-64, 30, T],
    "decreasing": [0, 40, 20, T],
    "past_the_end": [0, 30, 200],
    "short": [0, 20, 40],
    "huge": [0, 2**31 - 1, T],
    "extremes": [-(2**31), 2**31 - 1],
}
OPS = (compressed_attention, compressed_attention_backward, select_blocks, selected_attention,
       selected_attention_backward, sliding_window_attention, sliding_window_attention_backward)


@pytest.fixture
def kernel_paths():
    """CPU tensors take the Triton kernels (interpreter): the CPU kernels would reject the values."""
    with cpu_kernel_disabled(*OPS):
        yield


CASES = [(name, "fsa") for name in MALFORMED] + [("negative", "nsa"), ("extremes", "nsa")]


@pytest.mark.parametrize("name,impl", CASES)
def test_malformed_cu_seqlens_read_nothing_out_of_bounds(name, impl, kernel_paths):
    layer = make_small_layer()
    bad = torch.tensor(MALFORMED[name], dtype=torch.int32, device=DEVICE)
    x = torch.randn(1, T, 64, device=DEVICE, requires_grad=True)
    branches = layer.project(x, bad)
    q, k, v = branches["q"], branches["k"], branches["v"]
    o_cmp, lse_cmp = torch.ops.fsa.compressed_attention(q, branches["k_cmp"], branches["v_cmp"], 8, 4, None, bad)
    indices = torch.ops.fsa.select_blocks(q, branches["k_cmp"], lse_cmp, 8, 4, 8, 3, 1, 1, None, bad)
    o_slc, lse_slc = torch.ops.fsa.selected_attention(q, k, v, indices, 8, None, bad, impl)
    o_win, lse_win = torch.ops.fsa.sliding_window_attention(q, k, v, 16, None, bad)
    loss = sum((o * torch.randn_like(o)).sum() for o in (o_cmp, o_slc, o_win))
    loss = loss + sum(torch.where(lse.isfinite(), lse, 0).sum() for lse in (lse_cmp, lse_slc, lse_win))
    loss.backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # an illegal access would surface here, and fail every later CUDA call
    grads = [p.grad for p in (layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.compress_key)]
    for tensor in (o_cmp, o_slc, o_win, x.grad, *grads):
        assert torch.isfinite(tensor).all()
    assert ((indices >= -1) & (indices <= T // 8)).all()

    # The process is alive and a well-formed call is right: packed equals the two sequences run one by one.
    good = make_cu_seqlens((24, T - 24))
    x = torch.randn(1, T, 64, device=DEVICE)
    with torch.no_grad():
        packed = layer(x, good)
        one_by_one = torch.cat([layer(x[:, :24]), layer(x[:, 24:])], dim=1)
    assert_close("packed", one_by_one, packed, 2e-5)
