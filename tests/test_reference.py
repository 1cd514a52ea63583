"""The oracle against independent brute force: per-query loops with explicit key sets, in float64."""

import pytest
import torch

from fsa_compile import reference
from tests._testing import make_cu_seqlens, make_indices

DT = torch.float64


def brute_attention(q, k, v, keys_of, scale):
    """keys_of(i, hq) -> list of key rows for query i. q [Tq, Hq, D], k/v [Tk, Hkv, D]."""
    tq, hq, _ = q.shape
    group = hq // k.shape[1]
    o = torch.zeros(tq, hq, v.shape[-1], dtype=DT)
    lse = torch.full((tq, hq), float("-inf"), dtype=DT)
    for i in range(tq):
        for h in range(hq):
            keys = keys_of(i, h)
            if not keys:
                continue
            s = torch.stack([q[i, h] @ k[j, h // group] for j in keys]) * scale
            p = torch.softmax(s, 0)
            o[i, h] = sum(p[n] * v[j, h // group] for n, j in enumerate(keys))
            lse[i, h] = torch.logsumexp(s, 0)
    return o, lse


def qkv(tq, tk, hq=4, hkv=2, d=8):
    return torch.randn(tq, hq, d, dtype=DT), torch.randn(tk, hkv, d, dtype=DT), torch.randn(tk, hkv, d, dtype=DT)


@pytest.mark.parametrize("tq,tk", [(23, 23), (9, 30)])
def test_sliding_window(tq, tk):
    q, k, v = qkv(tq, tk)
    o, lse = reference.sliding_window_attention(q[None], k[None], v[None], 5)
    off = tk - tq
    want = brute_attention(q, k, v, lambda i, h: [j for j in range(tk) if i + off - 5 < j <= i + off], 8**-0.5)
    torch.testing.assert_close((o[0], lse[0]), want)


@pytest.mark.parametrize("tq,tk", [(40, 40), (11, 40)])
def test_compressed_attention(tq, tk):
    ks, st = 8, 4
    nc = (tk - ks) // st + 1
    q, kc, vc = qkv(tq, nc)
    o, lse = reference.compressed_attention(q[None], kc[None], vc[None], ks, st, 0.7, None, tk)
    off = tk - tq
    want = brute_attention(q, kc, vc, lambda i, h: [c for c in range(nc) if c * st + ks - 1 <= i + off], 0.7)
    torch.testing.assert_close((o[0], lse[0]), want)


def test_selected_attention():
    tq, tk, bs = 30, 37, 4
    q, k, v = qkv(tq, tk)
    indices = make_indices(1, tq, tk, 2, bs, 3, device="cpu")
    indices[0, 5, 1, -1] = 100  # out of range: ignored
    o, lse = reference.selected_attention(q[None], k[None], v[None], indices, bs)
    off = tk - tq

    def keys_of(i, h):
        blocks = {int(j) for j in indices[0, i, h // 2] if 0 <= j <= (i + off) // bs}
        return [j for j in range(tk) if j // bs in blocks and j <= i + off]

    torch.testing.assert_close((o[0], lse[0]), brute_attention(q, k, v, keys_of, 8**-0.5))


def test_varlen_is_independent_sequences():
    lengths = (7, 0, 12, 5)
    cu = make_cu_seqlens(lengths, device="cpu")
    q, k, v = qkv(24, 24)
    o, lse = reference.sliding_window_attention(q[None], k[None], v[None], 4, None, cu)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        want = reference.sliding_window_attention(q[None, part], k[None, part], v[None, part], 4)
        torch.testing.assert_close((o[:, part], lse[:, part]), want)
        start += n


def test_compress_matches_unfold_and_respects_sequences():
    x = torch.randn(2, 29, 3, 4, dtype=DT)
    weight = torch.randn(3, 8 * 4, 5, dtype=DT)
    pos = torch.randn(3, 8, 4, dtype=DT)
    out = reference.compress(x, weight, pos, 8, 4)
    windows = x.unfold(1, 8, 4)  # [B, Tc, H, D, ks]
    want = torch.einsum("bchdk,hkde->bche", windows + pos.transpose(1, 2)[None, None], weight.view(3, 8, 4, 5))
    torch.testing.assert_close(out, want)
    cu = make_cu_seqlens((10, 3, 16), device="cpu")
    packed = reference.compress(x[:1], weight, pos, 8, 4, cu)
    # Sequence lengths 10 -> 1 window, 3 -> 0, 16 -> 3; the tail of the (29-8)//4+1 = 6 rows is zero.
    torch.testing.assert_close(packed[:, :1], reference.compress(x[:1, :10], weight, pos, 8, 4))
    torch.testing.assert_close(packed[:, 1:4], reference.compress(x[:1, 13:29], weight, pos, 8, 4))
    assert packed.shape[1] == 6 and torch.all(packed[:, 4:] == 0)


def test_block_scores_by_spreading_probabilities_onto_tokens():
    ks, st, bs, tq = 8, 4, 8, 41
    nc = (tq - ks) // st + 1
    q, kc, _ = qkv(tq, nc)
    _, lse = reference.compressed_attention(q[None], kc[None], kc[None], ks, st)
    scores = reference.block_scores(q[None], kc[None], lse, ks, st, bs)[0]
    for t in (0, 10, 25, 40):
        for h in range(2):
            # Window c spreads p_c / stride onto each of its tokens; a block sums its tokens.
            per_token = torch.zeros(tq + bs, dtype=DT)
            for c in range(nc):
                if c * st + ks - 1 <= t:
                    p = sum(torch.exp(q[t, hh] @ kc[c, h] * 8**-0.5 - lse[0, t, hh]) for hh in (2 * h, 2 * h + 1))
                    per_token[c * st : c * st + ks] += p / st
            want = per_token[: (t // bs + 1) * bs].view(-1, bs).sum(-1)
            torch.testing.assert_close(scores[t, h, : t // bs + 1], want)
            assert torch.all(scores[t, h, t // bs + 1 :] == float("-inf"))


def test_select_blocks_properties():
    ks, st, bs, topk, init, local = 8, 4, 4, 4, 1, 1
    tq = 50
    q, kc, _ = qkv(tq, (tq - ks) // st + 1)
    _, lse = reference.compressed_attention(q[None], kc[None], kc[None], ks, st)
    indices = reference.select_blocks(q[None], kc[None], lse, ks, st, bs, topk, init, local)[0]
    scores = reference.block_scores(q[None], kc[None], lse, ks, st, bs)[0]
    for t in range(tq):
        for h in range(2):
            chosen = [int(j) for j in indices[t, h] if j >= 0]
            last = t // bs
            assert chosen == sorted(set(chosen)) and len(chosen) == min(topk, last + 1)
            forced = {0, last}
            assert forced <= set(chosen)
            free = [j for j in chosen if j not in forced]
            others = [j for j in range(last + 1) if j not in chosen]
            if free and others:
                assert min(scores[t, h, free]) >= max(scores[t, h, others])
