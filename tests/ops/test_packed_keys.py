"""Packed sequences whose queries are fewer than their keys (``cu_seqlens`` for the queries, ``cu_seqlens_k`` for
the keys; a chunked prefill of several sequences): every op, forward and backward, on each kernel path, against
the reference."""

import contextlib

import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops import compressed_attention, select_blocks, sliding_window_attention
from fsa_compile.ops._layout import num_compressed
from tests._testing import (
    DEVICE, SELECTED_PATHS, attention_path, check_attention, deterministic_algorithms, make_cu_seqlens, make_indices,
    make_qkv, selected_attention_path,
)

# (queries, keys) per sequence: a decode step, an empty query chunk, a chunk of a long sequence, a short one.
QUERIES, KEYS = (3, 1, 0, 9, 5), (20, 9, 4, 41, 5)
KS, STRIDE = 8, 4
PATHS = ("torch", "triton") if DEVICE == "cpu" else ("triton",)


def packed_inputs(dtype, hq=4, hkv=2, d=16):
    q, k, v = make_qkv(1, sum(QUERIES), sum(KEYS), hq, hkv, d, dtype=dtype)
    return q, k, v, make_cu_seqlens(QUERIES), make_cu_seqlens(KEYS)


def compressed_keys(dtype, hkv=2, d=16):
    """k_cmp, v_cmp packed by the key sequences, with the row count of the whole packed Tk."""
    rows = num_compressed(sum(KEYS), KS, STRIDE)
    assert sum(num_compressed(n, KS, STRIDE) for n in KEYS) <= rows
    _, k_cmp, v_cmp = make_qkv(1, 1, rows, hkv, hkv, d, dtype=dtype)
    return k_cmp, v_cmp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_sliding_window(path, dtype):
    q, k, v, cu_q, cu_k = packed_inputs(dtype)
    with attention_path(path, sliding_window_attention.sliding_window_attention,
                        sliding_window_attention.sliding_window_attention_backward):
        out = fsa_compile.sliding_window_attention(q, k, v, 7, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
        check_attention(out, lambda q, k, v: reference.sliding_window_attention(q, k, v, 7, None, cu_q, cu_k),
                        (q, k, v), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_compressed(path, dtype):
    q, _, _, cu_q, cu_k = packed_inputs(dtype)
    k_cmp, v_cmp = compressed_keys(dtype)
    with attention_path(path, compressed_attention.compressed_attention,
                        compressed_attention.compressed_attention_backward):
        out = fsa_compile.compressed_attention(q, k_cmp, v_cmp, KS, STRIDE, None, cu_q, sum(KEYS), cu_k)
        check_attention(
            out, lambda q, k, v: reference.compressed_attention(q, k, v, KS, STRIDE, None, cu_q, sum(KEYS), cu_k),
            (q, k_cmp, v_cmp), dtype,
        )


@pytest.mark.parametrize("path", PATHS)
def test_select_blocks_exactly(path):
    q, _, _, cu_q, cu_k = packed_inputs(torch.float64)
    q = q.detach()
    k_cmp, _ = compressed_keys(torch.float64)
    k_cmp = k_cmp.detach()
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, KS, STRIDE, None, cu_q, sum(KEYS), cu_k)
    args = (q, k_cmp, lse, KS, STRIDE, 8, 3, 1, 1, None, cu_q, sum(KEYS), cu_k)
    context = attention_path(path, select_blocks.select_blocks) if path == "triton" else contextlib.nullcontext()
    with context:
        # The interpreter's float64 goes to the PyTorch kernel: compare the Triton kernel in float32 instead.
        got = fsa_compile.select_blocks(*(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                          for x in args)) if path == "triton" else fsa_compile.select_blocks(*args)
    want = reference.select_blocks(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("impl", SELECTED_PATHS)
def test_selected(impl, dtype):
    q, k, v, cu_q, cu_k = packed_inputs(dtype)
    indices = make_indices(1, sum(QUERIES), sum(KEYS), 2, 8, 3, cu_q, cu_seqlens_k=cu_k)
    with selected_attention_path(impl) as impl:
        out = fsa_compile.selected_attention(q, k, v, indices, 8, None, cu_q, impl, cu_seqlens_k=cu_k)
        check_attention(out, lambda q, k, v: reference.selected_attention(q, k, v, indices, 8, None, cu_q, cu_k),
                        (q, k, v), dtype)


def test_deterministic_fsa_backward_with_packed_keys():
    """The deterministic dk/dv sum reads each key row's sequence start (not the query's)."""
    q, k, v, cu_q, cu_k = packed_inputs(torch.float32)
    indices = make_indices(1, sum(QUERIES), sum(KEYS), 2, 8, 3, cu_q, cu_seqlens_k=cu_k)
    with deterministic_algorithms(), selected_attention_path("fsa") as impl:
        out = fsa_compile.selected_attention(q, k, v, indices, 8, None, cu_q, impl, cu_seqlens_k=cu_k)
        check_attention(out, lambda q, k, v: reference.selected_attention(q, k, v, indices, 8, None, cu_q, cu_k),
                        (q, k, v), torch.float32)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(cu_seqlens_k=make_cu_seqlens((4, 4))), ValueError, "cu_seqlens_k needs cu_seqlens"),
        (dict(cu_seqlens=make_cu_seqlens(QUERIES), cu_seqlens_k=make_cu_seqlens((20, 9))), ValueError,
         r"cu_seqlens_k must have as many sequences as cu_seqlens: \[N\+1\] = \[6\], got \[3\]"),
        (dict(cu_seqlens=make_cu_seqlens(QUERIES), cu_seqlens_k=make_cu_seqlens(KEYS).long()), TypeError,
         "cu_seqlens_k must be int32, got torch.int64"),
        (dict(cu_seqlens=make_cu_seqlens(QUERIES)), ValueError, "pass cu_seqlens_k for packed keys of their own"),
    ],
    ids=["no-query-offsets", "sequence-count", "dtype", "Tq<Tk-without-key-offsets"],
)
def test_bad_key_offsets_raise(kwargs, error, message):
    q, k, v, _, _ = packed_inputs(torch.float32)
    with pytest.raises(error, match=message):
        fsa_compile.sliding_window_attention(q, k, v, 7, **kwargs)


def test_compressed_needs_seqlen_k_with_key_offsets():
    q, _, _, cu_q, cu_k = packed_inputs(torch.float32)
    k_cmp, v_cmp = compressed_keys(torch.float32)
    with pytest.raises(ValueError, match="with cu_seqlens_k, seqlen_k must be the number of packed keys"):
        fsa_compile.compressed_attention(q, k_cmp, v_cmp, KS, STRIDE, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
