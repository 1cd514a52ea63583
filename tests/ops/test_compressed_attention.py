import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops import _settings
from fsa_compile.ops.compressed_attention import compressed_attention, compressed_attention_backward
from tests._testing import (
    ATTENTION_PATHS, DEVICE, SMALL_CASES, attention_path, case_params, check_attention, check_on_query_suffix,
    make_cu_seqlens, make_qkv,
)


@pytest.fixture(params=ATTENTION_PATHS)
def path(request):
    with attention_path(request.param, compressed_attention, compressed_attention_backward):
        yield request.param

COMPRESSION = [(8, 4), (16, 16), (32, 16)]


def compressed_inputs(case, dtype, kernel_size, kernel_stride):
    q, _, _, cu = case.inputs(dtype)
    num_cmp = max(0, (case.num_keys - kernel_size) // kernel_stride + 1)
    _, k_cmp, v_cmp = make_qkv(case.batch, 1, num_cmp, case.hq, case.hkv, case.d, case.dv, dtype)
    seqlen_k = None if case.num_keys == case.num_queries else case.num_keys
    return q, k_cmp, v_cmp, cu, seqlen_k


@pytest.mark.parametrize("kernel_size,kernel_stride", COMPRESSION, ids=lambda x: str(x))
@pytest.mark.parametrize("case,dtype", case_params())
def test_matches_reference(case, dtype, kernel_size, kernel_stride, path):
    q, k_cmp, v_cmp, cu, seqlen_k = compressed_inputs(case, dtype, kernel_size, kernel_stride)
    out = fsa_compile.compressed_attention(q, k_cmp, v_cmp, kernel_size, kernel_stride, cu_seqlens=cu, seqlen_k=seqlen_k)
    check_attention(
        out,
        lambda q, k, v: reference.compressed_attention(q, k, v, kernel_size, kernel_stride, None, cu, seqlen_k),
        (q, k_cmp, v_cmp),
        dtype,
    )


def test_queries_that_see_nothing_get_zero_and_minus_inf(path):
    # T shorter than kernel_size: no compressed key at all.
    q, k_cmp, v_cmp = make_qkv(2, 20, 0, 4, 2, 16)
    o, lse = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 32, 16)
    assert torch.equal(o, torch.zeros_like(o)) and torch.all(lse == float("-inf"))
    (o.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    # Longer T: the first kernel_size - 1 queries see nothing, the rest see something.
    q, k_cmp, v_cmp = make_qkv(1, 50, 3, 2, 1, 8)
    o, lse = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 16, 16)
    assert torch.all(lse[:, :15] == float("-inf")) and torch.all(torch.isfinite(lse[:, 15:]))
    assert torch.equal(o[:, :15], torch.zeros_like(o[:, :15]))


def test_gradcheck():
    q, k, v = make_qkv(1, 13, 4, 2, 1, 4, 3, dtype=torch.float64)

    def fn(q, k, v):
        o, lse = fsa_compile.compressed_attention(q, k, v, 4, 3)
        return o, lse.masked_fill(lse.isinf(), 0)

    torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(varlen, path):
    q, k_cmp, v_cmp = make_qkv(1, 37, 8, 4, 2, 16)
    cu = torch.tensor([0, 20, 37], dtype=torch.int32, device=DEVICE) if varlen else None
    args = (q, k_cmp, v_cmp, 8, 4, None, cu)
    torch.library.opcheck(torch.ops.fsa.compressed_attention, args)
    o, lse = torch.ops.fsa.compressed_attention(*args)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(
            torch.ops.fsa.compressed_attention_backward,
            (torch.randn_like(o), dlse, q.detach(), k_cmp.detach(), v_cmp.detach(), o.detach(), lse.detach(), 8, 4, None, cu),
        )


def test_opcheck_fewer_queries_than_keys(path):
    q, k_cmp, v_cmp = make_qkv(2, 5, 9, 4, 4, 16)
    torch.library.opcheck(torch.ops.fsa.compressed_attention, (q, k_cmp, v_cmp, 8, 4, 0.2, None, 40))


@pytest.mark.gpu
@pytest.mark.parametrize("num_queries,group", [(4096, 1), (16384, 1), (16384, 4)], ids=lambda x: str(x))
def test_realistic_sizes_bf16(num_queries, group):
    """T = 4K..16K, bf16, D = 128, kernel 32 / stride 16. The oracle sees the last 384 queries only: the loss is
    put on those rows, so every gradient (dk_cmp, dv_cmp included) must match the reference on that suffix."""
    hkv, tail = 2, 384
    q, k_cmp, v_cmp = make_qkv(1, num_queries, (num_queries - 32) // 16 + 1, hkv * group, hkv, 128,
                               dtype=torch.bfloat16)
    o, lse = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 32, 16)
    check_on_query_suffix(
        o, lse, (q, k_cmp, v_cmp),
        lambda q, k, v: reference.compressed_attention(q, k, v, 32, 16, None, None, num_queries), tail,
    )


@pytest.mark.parametrize("group,d", [(16, 32), (3, 20), (5, 8)], ids=["G16-D32", "G3-D20", "G5-D8"])
def test_odd_groups_and_head_dims(group, d, path):
    """G = 16 (4 tokens per 64-row tile) and groups / head dims that are not powers of two; Dv = D + 4."""
    q, _, _ = make_qkv(1, 90, 1, 2 * group, 2, d)
    _, k_cmp, v_cmp = make_qkv(1, 1, (90 - 8) // 4 + 1, 2 * group, 2, d, d + 4)
    out = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 8, 4)
    check_attention(out, lambda q, k, v: reference.compressed_attention(q, k, v, 8, 4), (q, k_cmp, v_cmp),
                    torch.float32)


@pytest.mark.parametrize("case", [SMALL_CASES[0], SMALL_CASES[4], SMALL_CASES[5]], ids=lambda c: c.id)
def test_backward_splits_the_tokens_of_a_key_tile_into_chunks(case):
    """With 8-token chunks the dk/dv kernel splits each key tile's tokens over up to 8 programs whose float32
    partial sums are added afterwards (at T >= 8K this happens with the default settings)."""
    q, k_cmp, v_cmp, cu, seqlen_k = compressed_inputs(case, torch.float32, 8, 4)
    with _settings.override("masked_dkdv_chunk_tokens", 8), \
            attention_path("triton", compressed_attention, compressed_attention_backward):
        out = fsa_compile.compressed_attention(q, k_cmp, v_cmp, 8, 4, cu_seqlens=cu, seqlen_k=seqlen_k)
        check_attention(
            out, lambda q, k, v: reference.compressed_attention(q, k, v, 8, 4, None, cu, seqlen_k),
            (q, k_cmp, v_cmp), torch.float32,
        )


@pytest.mark.parametrize("num_keys,lengths", [(70, None), (5, None), (90, (40, 0, 50))], ids=["T70", "T5", "varlen"])
def test_rows_past_tc_are_ignored(num_keys, lengths, path):
    """k_cmp may carry up to Tk // kernel_stride + 2 rows (what the layer passes for a symbolic T): the rows past
    Tc change nothing, in compressed attention and in select_blocks, and get zero gradient."""
    from fsa_compile.ops.select_blocks import select_blocks

    kernel_size, kernel_stride = 16, 8
    cu = None if lengths is None else make_cu_seqlens(lengths)
    num_cmp = max(0, (num_keys - kernel_size) // kernel_stride + 1)
    extra = num_keys // kernel_stride + 2 - num_cmp
    q, k_cmp, v_cmp = make_qkv(1, num_keys, num_cmp, 4, 2, 16)
    junk = 5 * torch.randn(1, extra, 2, 16, device=DEVICE)  # never read: any values
    padded = [torch.cat([x.detach(), junk], 1).requires_grad_() for x in (k_cmp, v_cmp)]
    outputs = [fsa_compile.compressed_attention(q, kc, vc, kernel_size, kernel_stride, cu_seqlens=cu)
               for kc, vc in ((k_cmp, v_cmp), padded)]
    for want, got in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    do = torch.randn_like(outputs[0][0])
    exact = torch.autograd.grad(outputs[0][0], (k_cmp, v_cmp), do)
    with_padding = torch.autograd.grad(outputs[1][0], padded, do)
    for want, got in zip(exact, with_padding):
        torch.testing.assert_close(got[:, :num_cmp], want, rtol=0, atol=0)
        assert (got[:, num_cmp:] == 0).all()
    with select_blocks.set_kernel_enabled("cpu", path == "torch"):
        lse = outputs[0][1].detach()
        chosen = [fsa_compile.select_blocks(q, kc, lse, kernel_size, kernel_stride, 8, 3, cu_seqlens=cu)
                  for kc in (k_cmp, padded[0])]
    torch.testing.assert_close(chosen[1], chosen[0], rtol=0, atol=0)
