import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops import _settings
from fsa_compile.ops.sliding_window_attention import sliding_window_attention, sliding_window_attention_backward
from tests._testing import (
    ATTENTION_PATHS, DEVICE, SMALL_CASES, attention_path, case_params, check_attention, check_on_query_suffix,
    make_qkv,
)


@pytest.fixture(params=ATTENTION_PATHS)
def path(request):
    with attention_path(request.param, sliding_window_attention, sliding_window_attention_backward):
        yield request.param


@pytest.mark.parametrize("window_size", [1, 16, 45, 10_000])
@pytest.mark.parametrize("case,dtype", case_params())
def test_matches_reference(case, dtype, window_size, path):
    q, k, v, cu = case.inputs(dtype)
    out = fsa_compile.sliding_window_attention(q, k, v, window_size, cu_seqlens=cu)
    check_attention(out, lambda q, k, v: reference.sliding_window_attention(q, k, v, window_size, None, cu), (q, k, v), dtype)


def test_custom_scale_and_noncontiguous_inputs(path):
    q, k, v = make_qkv(2, 40, 40, 4, 2, 32, dtype=torch.float32)
    # Non-contiguous views: heads and tokens swapped in memory.
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    assert not qt.is_contiguous()
    out = fsa_compile.sliding_window_attention(qt, kt, vt, 7, scale=0.3)
    check_attention(out, lambda q, k, v: reference.sliding_window_attention(q, k, v, 7, 0.3), (qt, kt, vt), torch.float32)


def test_gradcheck():
    q, k, v = make_qkv(1, 9, 12, 2, 1, 4, 3, dtype=torch.float64)
    cu = None
    torch.autograd.gradcheck(lambda q, k, v: fsa_compile.sliding_window_attention(q, k, v, 4, None, cu), (q, k, v))


def test_gradcheck_varlen():
    q, k, v = make_qkv(1, 11, 11, 2, 2, 4, dtype=torch.float64)
    cu = torch.tensor([0, 5, 11], dtype=torch.int32, device=q.device)
    torch.autograd.gradcheck(lambda q, k, v: fsa_compile.sliding_window_attention(q, k, v, 3, None, cu), (q, k, v))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(varlen, path):
    q, k, v = make_qkv(1, 21, 21, 4, 2, 16)
    cu = torch.tensor([0, 8, 21], dtype=torch.int32, device=DEVICE) if varlen else None
    torch.library.opcheck(torch.ops.fsa.sliding_window_attention, (q, k, v, 5, None, cu))
    o, lse = torch.ops.fsa.sliding_window_attention(q, k, v, 5, None, cu)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(
            torch.ops.fsa.sliding_window_attention_backward,
            (torch.randn_like(o), dlse, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), 5, None, cu),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("num_queries,group", [(4096, 1), (16384, 1), (16384, 4)], ids=lambda x: str(x))
def test_realistic_sizes_bf16(num_queries, group):
    """T = 4K..16K, bf16, D = 128, window 512. The oracle sees the last 384 queries only: the loss is put on
    those rows, so every gradient (dk, dv included) must match the reference on that suffix."""
    hkv, tail = 2, 384
    q, k, v = make_qkv(1, num_queries, num_queries, hkv * group, hkv, 128, dtype=torch.bfloat16)
    o, lse = fsa_compile.sliding_window_attention(q, k, v, 512)
    check_on_query_suffix(
        o, lse, (q, k, v), lambda q, k, v: reference.sliding_window_attention(q, k, v, 512), tail
    )


@pytest.mark.parametrize("group,d", [(16, 32), (3, 20), (5, 8)], ids=["G16-D32", "G3-D20", "G5-D8"])
def test_odd_groups_and_head_dims(group, d, path):
    """G = 16 (4 tokens per 64-row tile) and groups / head dims that are not powers of two; Dv = D + 4."""
    q, k, v = make_qkv(1, 90, 90, 2 * group, 2, d, d + 4)
    out = fsa_compile.sliding_window_attention(q, k, v, 17)
    check_attention(out, lambda q, k, v: reference.sliding_window_attention(q, k, v, 17), (q, k, v), torch.float32)


@pytest.mark.parametrize("case", [SMALL_CASES[0], SMALL_CASES[4]], ids=lambda c: c.id)
def test_backward_splits_the_tokens_of_a_key_tile_into_chunks(case):
    """8-token chunks: the window's bound on the tokens that see a key sets the chunks, which must cover them."""
    q, k, v, cu = case.inputs(torch.float32)
    with _settings.override("masked_dkdv_chunk_tokens", 8), \
            attention_path("triton", sliding_window_attention, sliding_window_attention_backward):
        out = fsa_compile.sliding_window_attention(q, k, v, 21, cu_seqlens=cu)
        check_attention(
            out, lambda q, k, v: reference.sliding_window_attention(q, k, v, 21, None, cu), (q, k, v), torch.float32
        )
