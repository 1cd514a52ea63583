"""Every class of bad input raises a ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import fsa_compile

B, T, HQ, HKV, D = 1, 24, 4, 2, 8


def good():
    q = torch.randn(B, T, HQ, D)
    k = torch.randn(B, T, HKV, D)
    v = torch.randn(B, T, HKV, D)
    k_cmp = torch.randn(B, (T - 8) // 4 + 1, HKV, D)
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, 8, 4)
    indices = torch.zeros(B, T, HKV, 2, dtype=torch.int32)
    return dict(q=q, k=k, v=v, k_cmp=k_cmp, lse=lse, indices=indices)


def window(x, **kw):
    args = dict(q=x["q"], k=x["k"], v=x["v"], window_size=4) | kw
    return fsa_compile.sliding_window_attention(**args)


def selected(x, **kw):
    args = dict(q=x["q"], k=x["k"], v=x["v"], indices=x["indices"], block_size=4) | kw
    return fsa_compile.selected_attention(**args)


def compressed(x, **kw):
    args = dict(q=x["q"], k_cmp=x["k_cmp"], v_cmp=x["k_cmp"], kernel_size=8, kernel_stride=4) | kw
    return fsa_compile.compressed_attention(**args)


def select(x, **kw):
    args = dict(q=x["q"], k_cmp=x["k_cmp"], lse=x["lse"], kernel_size=8, kernel_stride=4, block_size=4, topk=3,
                init_blocks=1, local_blocks=1) | kw
    return fsa_compile.select_blocks(**args)


def cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


CASES = [
    # (id, call, error, message fragment)
    ("q-rank", lambda x: window(x, q=x["q"][0]), ValueError, r"q must be 4-D \[B, Tq, Hq, D\], got shape \(24, 4, 8\)"),
    ("q-not-tensor", lambda x: window(x, q=x["q"].numpy()), TypeError, "q must be a torch.Tensor, got ndarray"),
    ("q-int", lambda x: window(x, q=x["q"].int(), k=x["k"].int(), v=x["v"].int()), TypeError, "q must be float16"),
    ("dtype-mismatch", lambda x: window(x, k=x["k"].half()), TypeError, r"k.dtype must equal q.dtype=torch.float32, got torch.float16"),
    ("gqa", lambda x: window(x, q=torch.randn(B, T, 3, D)), ValueError, r"Hq=3 \(q.shape\[2\]\) is not a multiple of Hkv=2"),
    ("head-dim", lambda x: window(x, k=torch.randn(B, T, HKV, 4)), ValueError, "k head dim must equal q's D=8, got 4"),
    ("head-dim-too-large", lambda x: window(x, q=torch.randn(B, T, HQ, 300), k=torch.randn(B, T, HKV, 300)),
     ValueError, r"q head dim must be in \[1, 256\], got 300"),
    ("batch", lambda x: window(x, k=torch.randn(2, T, HKV, D)), ValueError, "batch sizes differ"),
    ("kv-length", lambda x: window(x, v=torch.randn(B, T - 1, HKV, D)), ValueError, "k and v must have the same length"),
    ("fewer-keys", lambda x: window(x, k=x["k"][:, :5], v=x["v"][:, :5]), ValueError, "k must have at least as many tokens as q"),
    ("device", lambda x: window(x, k=x["k"].to("meta")), ValueError, "k must be on cpu like q, got meta"),
    ("window-size", lambda x: window(x, window_size=0), ValueError, "window_size must be >= 1, got 0"),
    ("window-size-type", lambda x: window(x, window_size=2.5), TypeError, "window_size must be an int, got float"),
    ("scale-type", lambda x: window(x, scale="big"), TypeError, "scale must be a float or None, got str"),
    ("cu-dtype", lambda x: window(x, cu_seqlens=cu([0, T], torch.int64)), TypeError, "cu_seqlens must be int32, got torch.int64"),
    ("cu-rank", lambda x: window(x, cu_seqlens=cu([[0, T]])), ValueError, r"cu_seqlens must be 1-D \[N\+1\]"),
    ("cu-batch", lambda x: window(x, q=torch.randn(2, T, HQ, D), k=torch.randn(2, T, HKV, D), v=torch.randn(2, T, HKV, D),
                                  cu_seqlens=cu([0, T])), ValueError, "with cu_seqlens, q must be packed with B=1, got B=2"),
    ("cu-start", lambda x: window(x, cu_seqlens=cu([1, T])), ValueError, "cu_seqlens must start at 0"),
    ("cu-decreasing", lambda x: window(x, cu_seqlens=cu([0, 10, 5, T])), ValueError, "non-decreasing"),
    ("cu-end", lambda x: window(x, cu_seqlens=cu([0, 10])), ValueError, "end at T=24"),
    ("cu-tq-tk", lambda x: window(x, q=x["q"][:, :20], cu_seqlens=cu([0, 20])), ValueError, "Tq=20, Tk=24"),
    ("indices-dtype", lambda x: selected(x, indices=x["indices"].long()), TypeError, "indices must be int32, got torch.int64"),
    ("indices-shape", lambda x: selected(x, indices=x["indices"][:, :-1]), ValueError,
     r"indices must have shape \[B, Tq, Hkv, topk\] = \[1, 24, 2, topk\], got \(1, 23, 2, 2\)"),
    ("block-size", lambda x: selected(x, block_size=0), ValueError, "block_size must be >= 1, got 0"),
    ("stride-gaps", lambda x: compressed(x, kernel_size=4, kernel_stride=8), ValueError, "kernel_stride must be <= kernel_size"),
    ("k-cmp-rows", lambda x: compressed(x, k_cmp=x["k_cmp"][:, :-1], v_cmp=x["k_cmp"][:, :-1]), ValueError,
     r"k_cmp must have Tc = max\(0, \(Tk - kernel_size\) // kernel_stride \+ 1\) = 5 rows"),
    ("seqlen-k-small", lambda x: compressed(x, seqlen_k=10), ValueError, r"seqlen_k must be >= Tq=24 \(queries are the last Tq keys\), got 10"),
    ("seqlen-k-varlen", lambda x: compressed(x, seqlen_k=24, cu_seqlens=cu([0, T])), ValueError, "seqlen_k must be None with cu_seqlens"),
    ("k-cmp-too-many-rows", lambda x: compressed(x, k_cmp=x["k"], v_cmp=x["v"]), ValueError,
     r"or up to Tk // kernel_stride \+ 2 = 8 with zero rows after them"),
    ("lse-dtype", lambda x: select(x, lse=x["lse"].half()), TypeError, "lse must be torch.float32"),
    ("lse-shape", lambda x: select(x, lse=x["lse"][:, :, :2]), ValueError, r"lse must have shape \[B, Tq, Hq\]"),
    ("topk", lambda x: select(x, topk=0), ValueError, "topk must be >= 1, got 0"),
    ("forced-over-topk", lambda x: select(x, init_blocks=2, local_blocks=2), ValueError, r"init_blocks \+ local_blocks must be <= topk"),
    ("local-negative", lambda x: select(x, local_blocks=-1), ValueError, "local_blocks must be >= 0, got -1"),
]


def head_major(heads, kv_heads, num_tokens, num_keys=None):
    """q, k, v (and indices) of a user who built them as [B, H, T, D]."""
    num_keys = num_tokens if num_keys is None else num_keys
    return dict(q=torch.randn(1, heads, num_tokens, 16), k=torch.randn(1, kv_heads, num_keys, 16),
                v=torch.randn(1, kv_heads, num_keys, 16),
                indices=torch.zeros(1, num_tokens, kv_heads, 3, dtype=torch.int32))


LOOKS_HEAD_MAJOR = r".*look like \[B, H, T, D\], but fsa ops take token-major \[B, T, H, D\]: pass q.transpose\(1, 2\)"
CASES += [
    ("head-major-indices", lambda x: selected(head_major(4, 2, 100)), ValueError,
     r"indices must have shape \[B, Tq, Hkv, topk\] = \[1, 4, 100, topk\], got \(1, 100, 2, 3\)" + LOOKS_HEAD_MAJOR),
    ("head-major-fewer-keys", lambda x: window(head_major(4, 2, 64)), ValueError,
     "k must have at least as many tokens as q: Tq=4, Tk=2" + LOOKS_HEAD_MAJOR),
    ("head-major-gqa", lambda x: window(head_major(4, 2, 100, 120)), ValueError,
     r"Hq=100 \(q.shape\[2\]\) is not a multiple of Hkv=120" + LOOKS_HEAD_MAJOR),
    ("head-major-same-heads", lambda x: window(head_major(4, 4, 256)), ValueError,
     r"q has Hq=256 heads \(q.shape\[2\]\), more than 128" + LOOKS_HEAD_MAJOR),
]


def test_many_heads_alone_are_not_taken_for_head_major():
    """A genuine q with more than 128 heads (decode: one token) is accepted: its transpose fits no rule."""
    q, k, v = torch.randn(1, 1, 256, 16), torch.randn(1, 9, 256, 16), torch.randn(1, 9, 256, 16)
    o, _ = fsa_compile.sliding_window_attention(q, k, v, 4)
    assert o.shape == q.shape


@pytest.mark.parametrize("call,error,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        call(good())


def test_ops_validate_under_fake_tensors():
    """The fake functions run the same checks, so torch.compile reports bad input at trace time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(B, T, 3, D)
        k = torch.empty(B, T, HKV, D)
        with pytest.raises(ValueError, match="Hq=3"):
            torch.ops.fsa.sliding_window_attention(q, k, k, 4)


def test_layer_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        fsa_compile.FlashSparseAttention(64, 6, 4, 16)
    with pytest.raises(ValueError, match="head_dim must be a positive even number"):
        fsa_compile.FlashSparseAttention(64, 4, 2, 15)
    layer = fsa_compile.FlashSparseAttention(64, 4, 2, 16)
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden_size=64\]"):
        layer(torch.randn(2, 10, 32))


@pytest.mark.parametrize("values,total,message", [
    ([0, 10, 24], 24, None),
    ([0, 24], 24, None),
    ([1, 10, 24], 24, "start at 0"),
    ([0, 10, 23], 24, "end at T=24"),
    ([0, 12, 10, 24], 24, "non-decreasing"),
], ids=["ok", "one", "start", "end", "decreasing"])
def test_check_cu_seqlens(values, total, message):
    bounds = torch.tensor(values, dtype=torch.int32)
    if message is None:
        fsa_compile.check_cu_seqlens(bounds, total)
        return
    with pytest.raises(ValueError, match=message):
        fsa_compile.check_cu_seqlens(bounds, total)
    with pytest.raises(TypeError, match="int32"):
        fsa_compile.check_cu_seqlens(bounds.long(), total)
