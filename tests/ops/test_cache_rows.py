"""A batch of caches filled to different lengths (``seqlens_k``: row b holds ``seqlens_k[b]`` keys of its buffer,
its queries are the last Tq of them): every op, forward and backward, on each kernel path, against the reference.
The buffers' rows past each fill hold large values: reading one would show."""

import contextlib

import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops import compressed_attention, max_compressed_rows, select_blocks, sliding_window_attention
from tests._testing import (
    DEVICE, SELECTED_PATHS, attention_path, check_attention, deterministic_algorithms, make_cu_seqlens, make_indices,
    make_qkv, selected_attention_path,
)

BUFFER = 40  # Tk: the keys each row's buffer holds
FILLS = {"decode": (1, (40, 1, 23, 9)), "chunk": (3, (40, 5, 23, 3))}  # (Tq, seqlens_k)
KS, STRIDE, BLOCK = 8, 4, 8
PATHS = ("torch", "triton") if DEVICE == "cpu" else ("triton",)


def cache_inputs(dtype, num_queries, fills, hq=4, hkv=2, d=16):
    """q [B, Tq], k, v [B, BUFFER] with 100 * randn past each fill, and seqlens_k."""
    q, k, v = make_qkv(len(fills), num_queries, BUFFER, hq, hkv, d, dtype=dtype)
    seqlens_k = torch.tensor(fills, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        unfilled = (torch.arange(BUFFER, device=DEVICE)[None, :] >= seqlens_k[:, None].long())[..., None, None]
        for x in (k, v):
            x.copy_(torch.where(unfilled, 100 * torch.randn_like(x), x))
    return q, k, v, seqlens_k


def compressed_keys(dtype, fills, hkv=2, d=16):
    """k_cmp, v_cmp [B, BUFFER // STRIDE + 2] (the cache's row count), 100 * randn past each row's windows."""
    rows = max_compressed_rows(BUFFER, STRIDE)
    _, k_cmp, v_cmp = make_qkv(len(fills), 1, rows, hkv, hkv, d, dtype=dtype)
    windows = torch.tensor([max(0, (n - KS) // STRIDE + 1) for n in fills], device=DEVICE)
    with torch.no_grad():
        unfilled = (torch.arange(rows, device=DEVICE)[None, :] >= windows[:, None])[..., None, None]
        for x in (k_cmp, v_cmp):
            x.copy_(torch.where(unfilled, 100 * torch.randn_like(x), x))
    return k_cmp, v_cmp


@pytest.mark.parametrize("fills", FILLS.values(), ids=FILLS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_sliding_window(path, dtype, fills):
    q, k, v, seqlens_k = cache_inputs(dtype, *fills)
    with attention_path(path, sliding_window_attention.sliding_window_attention,
                        sliding_window_attention.sliding_window_attention_backward):
        out = fsa_compile.sliding_window_attention(q, k, v, 7, seqlens_k=seqlens_k)
        check_attention(out, lambda q, k, v: reference.sliding_window_attention(q, k, v, 7, seqlens_k=seqlens_k),
                        (q, k, v), dtype)


@pytest.mark.parametrize("fills", FILLS.values(), ids=FILLS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_compressed(path, dtype, fills):
    q, _, _, seqlens_k = cache_inputs(dtype, *fills)
    k_cmp, v_cmp = compressed_keys(dtype, fills[1])
    with attention_path(path, compressed_attention.compressed_attention,
                        compressed_attention.compressed_attention_backward):
        out = fsa_compile.compressed_attention(q, k_cmp, v_cmp, KS, STRIDE, seqlen_k=BUFFER, seqlens_k=seqlens_k)
        check_attention(out, lambda q, k, v: reference.compressed_attention(
            q, k, v, KS, STRIDE, seqlen_k=BUFFER, seqlens_k=seqlens_k), (q, k_cmp, v_cmp), dtype)


@pytest.mark.parametrize("op", ["window", "compressed"])
@pytest.mark.parametrize("fills", FILLS.values(), ids=FILLS.keys())
def test_split_keys_forward(fills, op):
    """The masked forward split over programs (split-K, forced here on small spans), merged by log-sum-exp."""
    from fsa_compile.ops import _settings

    q, k, v, seqlens_k = cache_inputs(torch.float32, *fills)
    k_cmp, v_cmp = compressed_keys(torch.float32, fills[1])
    with _settings.override("masked_fwd_programs", 1000), _settings.override("masked_fwd_split_min_keys", 3), \
            attention_path("triton", sliding_window_attention.sliding_window_attention,
                           sliding_window_attention.sliding_window_attention_backward,
                           compressed_attention.compressed_attention,
                           compressed_attention.compressed_attention_backward):
        if op == "window":
            out = fsa_compile.sliding_window_attention(q, k, v, 17, seqlens_k=seqlens_k)
            check_attention(out, lambda q, k, v: reference.sliding_window_attention(q, k, v, 17, seqlens_k=seqlens_k),
                            (q, k, v), torch.float32)
        else:
            out = fsa_compile.compressed_attention(q, k_cmp, v_cmp, KS, STRIDE, seqlen_k=BUFFER, seqlens_k=seqlens_k)
            check_attention(out, lambda q, k, v: reference.compressed_attention(
                q, k, v, KS, STRIDE, seqlen_k=BUFFER, seqlens_k=seqlens_k), (q, k_cmp, v_cmp), torch.float32)


@pytest.mark.parametrize("few_queries", [0, 16], ids=["kernel", "few-queries"])
@pytest.mark.parametrize("fills", FILLS.values(), ids=FILLS.keys())
@pytest.mark.parametrize("path", PATHS)
def test_select_blocks_exactly(path, fills, few_queries):
    """On the device path, rows of at most ``select_blocks_few_queries`` queries take the PyTorch selection, others
    the Triton kernel (as one packed row)."""
    from fsa_compile.ops import _settings

    if path == "torch" and few_queries:
        pytest.skip("the CPU path has no few-queries variant")
    q, _, _, seqlens_k = cache_inputs(torch.float64, *fills)
    k_cmp, _ = compressed_keys(torch.float64, fills[1])
    q, k_cmp = q.detach(), k_cmp.detach()
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, KS, STRIDE, seqlen_k=BUFFER, seqlens_k=seqlens_k)
    args = (q, k_cmp, lse, KS, STRIDE, BLOCK, 3, 1, 1, None, None, BUFFER, None, seqlens_k)
    context = attention_path(path, select_blocks.select_blocks) if path == "triton" else contextlib.nullcontext()
    with context, _settings.override("select_blocks_few_queries", few_queries):
        # The interpreter's float64 goes to the PyTorch kernel: compare the Triton kernel in float32 instead.
        got = fsa_compile.select_blocks(*(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                          for x in args)) if path == "triton" else fsa_compile.select_blocks(*args)
    torch.testing.assert_close(got, reference.select_blocks(*args), rtol=0, atol=0)


@pytest.mark.parametrize("fills", FILLS.values(), ids=FILLS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("impl", SELECTED_PATHS)
def test_selected(impl, dtype, fills):
    num_queries, lengths = fills
    q, k, v, seqlens_k = cache_inputs(dtype, *fills)
    indices = torch.cat([make_indices(1, num_queries, n, 2, BLOCK, 3) for n in lengths])
    with selected_attention_path(impl) as impl:
        out = fsa_compile.selected_attention(q, k, v, indices, BLOCK, impl=impl, seqlens_k=seqlens_k)
        check_attention(out, lambda q, k, v: reference.selected_attention(q, k, v, indices, BLOCK, seqlens_k=seqlens_k),
                        (q, k, v), dtype)


def test_deterministic_fsa_backward_over_caches():
    q, k, v, seqlens_k = cache_inputs(torch.float32, *FILLS["chunk"])
    indices = torch.cat([make_indices(1, 3, n, 2, BLOCK, 3) for n in FILLS["chunk"][1]])
    with deterministic_algorithms(), selected_attention_path("fsa") as impl:
        out = fsa_compile.selected_attention(q, k, v, indices, BLOCK, impl=impl, seqlens_k=seqlens_k)
        check_attention(out, lambda q, k, v: reference.selected_attention(q, k, v, indices, BLOCK,
                                                                              seqlens_k=seqlens_k),
                        (q, k, v), torch.float32)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(seqlens_k=torch.tensor([40, 5, 23, 3])), TypeError, "seqlens_k must be int32, got torch.int64"),
        (dict(seqlens_k=torch.tensor([40, 5], dtype=torch.int32)), ValueError,
         r"seqlens_k must have shape \[B\] = \[4\], got \(2,\)"),
        (dict(seqlens_k=[40, 5, 23, 3]), TypeError, "seqlens_k must be a torch.Tensor or None, got list"),
    ],
    ids=["dtype", "shape", "type"],
)
def test_bad_seqlens_k_raise(kwargs, error, message):
    q, k, v, _ = cache_inputs(torch.float32, *FILLS["chunk"])
    if isinstance(kwargs["seqlens_k"], torch.Tensor):
        kwargs = dict(seqlens_k=kwargs["seqlens_k"].to(DEVICE))
    with pytest.raises(error, match=message):
        fsa_compile.sliding_window_attention(q, k, v, 7, **kwargs)


def test_seqlens_k_is_for_batched_caches_only():
    q, k, v, _ = cache_inputs(torch.float32, 3, (40,))
    with pytest.raises(ValueError, match="seqlens_k is for a batch of caches"):
        fsa_compile.sliding_window_attention(q, k, v, 7, cu_seqlens=make_cu_seqlens((40,)),
                                             cu_seqlens_k=make_cu_seqlens((40,)),
                                             seqlens_k=torch.tensor([40], dtype=torch.int32, device=DEVICE))


def test_compressed_needs_the_buffer_length_with_seqlens_k():
    q, _, _, seqlens_k = cache_inputs(torch.float32, *FILLS["chunk"])
    k_cmp, v_cmp = compressed_keys(torch.float32, FILLS["chunk"][1])
    with pytest.raises(ValueError, match="with seqlens_k, seqlen_k must be the length Tk of the key buffers"):
        fsa_compile.compressed_attention(q, k_cmp, v_cmp, KS, STRIDE, seqlens_k=seqlens_k)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernels read the fills; CUDA clamps them (no sync)")
def test_fill_outside_the_buffer_raises_on_cpu():
    q, k, v, _ = cache_inputs(torch.float32, *FILLS["chunk"])
    seqlens_k = torch.tensor([41, 5, 23, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seqlens_k must be in \[Tq, Tk\] = \[3, 40\]"):
        fsa_compile.sliding_window_attention(q, k, v, 7, seqlens_k=seqlens_k)
