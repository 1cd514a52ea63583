"""The oracle: slow, obviously-correct NSA written straight from DESIGN.md.

Every function here works in the dtype it is given (use float64 for a golden answer), builds dense masks or
loops over tokens, and shares no code with ``ops/`` or the rest of the package. Tests compare the fast paths
against these functions; nothing else should call them.

Conventions (DESIGN.md): token-major ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``; query ``i`` sits at
position ``Tk - Tq + i``; with ``cu_seqlens`` (``B == 1``) every sequence is independent and positions restart
at 0; ``cu_seqlens_k`` packs the keys on their own (default: the queries' ``cu_seqlens``), and a sequence's queries
are the last of its keys; ``seqlens_k`` (int32 [B], a batch of caches) says row b holds only ``seqlens_k[b]`` keys
(its queries the last Tq of them; compressed keys the first rows of ``k_cmp[b]``); query head ``h`` uses KV head
``h // G``.
"""

from __future__ import annotations

import torch

__all__ = [
    "rotary_embedding",
    "compress",
    "compressed_attention",
    "block_scores",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "gated_combine",
    "nsa_layer",
]


def _spans(total: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """(start, end) of every sequence along the token axis."""
    if cu_seqlens is None:
        return [(0, total)]
    bounds = [int(c) for c in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def _num_windows(length: int, kernel_size: int, kernel_stride: int) -> int:
    return max(0, (length - kernel_size) // kernel_stride + 1)


def _query_key_spans(tq, tk, cu_seqlens, cu_seqlens_k):
    """((query start, query end), (key start, key end)) of every sequence."""
    if cu_seqlens is None:
        return [((0, tq), (0, tk))]
    return list(zip(_spans(tq, cu_seqlens), _spans(tk, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k)))


def _row_keys(tk: int, seqlens_k, b: int) -> int:
    """Keys of batch row b: all Tk, or its fill with seqlens_k."""
    return tk if seqlens_k is None else int(seqlens_k[b])


def _compressed_sequences(tq, tk, kernel_size, kernel_stride, cu_seqlens, cu_seqlens_k=None):
    """(query start, query end, first compressed row, number of raw keys) of every sequence."""
    seqs, offset = [], 0
    for (start, end), (key_start, key_end) in _query_key_spans(tq, tk, cu_seqlens, cu_seqlens_k):
        seqs.append((start, end, offset, key_end - key_start))
        offset += _num_windows(key_end - key_start, kernel_size, kernel_stride)
    return seqs


def _dense_attention(q, k, v, allowed, scale):
    """Softmax attention of one sequence under an explicit boolean mask.

    q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], allowed [Tq, Hq, Tk] -> o [Tq, Hq, Dv], lse [Tq, Hq].
    Rows with no allowed key give o = 0 and lse = -inf.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->qhk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite_lse.unsqueeze(-1))
    return torch.einsum("qhk,khd->qhd", probs, v), lse


def _attention(q, k, v, scale, cu_seqlens, mask_fn, cu_seqlens_k=None, seqlens_k=None):
    """Run ``_dense_attention`` per batch row and sequence.

    ``mask_fn(query_pos [Tq], num_keys) -> allowed [Tq, Hq or 1, Tk]``; positions are within the sequence.
    """
    batch, tq, hq, _ = q.shape
    tk = k.shape[1]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for b in range(batch):
        out_b = []
        lse_b = []
        for (qs, qe), (ks, ke) in _query_key_spans(tq, _row_keys(tk, seqlens_k, b), cu_seqlens, cu_seqlens_k):
            nq, nk = qe - qs, ke - ks
            query_pos = torch.arange(nq, device=q.device) + (nk - nq)
            allowed = mask_fn(query_pos, nk, b, qs).expand(nq, hq, nk)
            o, lse = _dense_attention(q[b, qs:qe], k[b, ks:ke], v[b, ks:ke], allowed, scale)
            out_b.append(o)
            lse_b.append(lse)
        outs.append(torch.cat(out_b))
        lses.append(torch.cat(lse_b))
    return torch.stack(outs), torch.stack(lses)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T, H, D] (D even), positions [B or 1, T] (integer) -> [B, T, H, D]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64, device=x.device) / half))
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [B, T, half]
    cos = torch.cos(angles).unsqueeze(2).to(x.dtype)
    sin = torch.sin(angles).unsqueeze(2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def compress(x, weight, pos_emb, kernel_size, kernel_stride, cu_seqlens=None):
    """Compress windows of tokens with a learned linear map.

    Window ``i`` of a sequence covers tokens ``[i*kernel_stride, i*kernel_stride + kernel_size)``; the
    intra-window position embedding is added and the window is flattened and multiplied by the per-head map:
    ``out[i, h] = flatten(x[window_i, h] + pos_emb[h]) @ weight[h]``.

    x [B, T, H, D], weight [H, kernel_size * D, Dout], pos_emb [H, kernel_size, D] -> [B, Tc, H, Dout]
    with ``Tc = max(0, (T - kernel_size) // kernel_stride + 1)``. With ``cu_seqlens`` windows stay inside
    their sequence, the compressed sequences are packed one after another and the tail is zero.
    """
    batch, total, heads, _ = x.shape
    out = x.new_zeros(batch, _num_windows(total, kernel_size, kernel_stride), heads, weight.shape[-1])
    for b in range(batch):
        row = 0
        for start, end in _spans(total, cu_seqlens):
            for i in range(_num_windows(end - start, kernel_size, kernel_stride)):
                first = start + i * kernel_stride
                window = x[b, first : first + kernel_size] + pos_emb.transpose(0, 1)  # [ks, H, D]
                flat = window.transpose(0, 1).reshape(heads, -1)  # [H, ks*D]
                out[b, row] = torch.einsum("hk,hkd->hd", flat, weight)
                row += 1
    return out


def compressed_attention(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale=None, cu_seqlens=None, seqlen_k=None,
                         cu_seqlens_k=None, seqlens_k=None):
    """Query at position t sees compressed key i iff ``t >= i*kernel_stride + kernel_size - 1``.

    q [B, Tq, Hq, D], k_cmp/v_cmp [B, Tc, Hkv, D] -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq].
    """
    batch, tq, hq, _ = q.shape
    if scale is None:
        scale = q.shape[-1] ** -0.5
    tk = tq if seqlen_k is None else seqlen_k
    outs, lses = [], []
    for b in range(batch):
        seqs = _compressed_sequences(tq, _row_keys(tk, seqlens_k, b), kernel_size, kernel_stride, cu_seqlens,
                                     cu_seqlens_k)
        o_b, lse_b = [], []
        for qs, qe, cs, nk in seqs:
            nq = qe - qs
            nc = _num_windows(nk, kernel_size, kernel_stride)
            pos = torch.arange(nq, device=q.device) + (nk - nq)
            window_end = torch.arange(nc, device=q.device) * kernel_stride + kernel_size - 1
            allowed = (pos[:, None] >= window_end[None, :])[:, None, :].expand(nq, hq, nc)
            o, lse = _dense_attention(q[b, qs:qe], k_cmp[b, cs : cs + nc], v_cmp[b, cs : cs + nc], allowed, scale)
            o_b.append(o)
            lse_b.append(lse)
        outs.append(torch.cat(o_b))
        lses.append(torch.cat(lse_b))
    return torch.stack(outs), torch.stack(lses)


def block_scores(q, k_cmp, lse, kernel_size, kernel_stride, block_size, scale=None, cu_seqlens=None, seqlen_k=None,
                 cu_seqlens_k=None, seqlens_k=None):
    """Selection score of every key block, token by token, exactly as DESIGN.md states it.

    ``score[b, t, h, j] = sum_i (sum_{hq in group h} exp(q_hq . k_cmp_i * scale - lse[hq])) * w(i, j)`` over
    the compressed keys i visible to t, ``w(i, j)`` = tokens shared by window i and block j over
    ``kernel_stride``. Non-candidate blocks (``j > t // block_size``) are ``-inf``.
    -> float64 [B, Tq, Hkv, max_blocks] where max_blocks covers the longest sequence.
    """
    batch, tq, hq, _ = q.shape
    hkv = k_cmp.shape[2]
    group = hq // hkv
    if scale is None:
        scale = q.shape[-1] ** -0.5
    tk = tq if seqlen_k is None else seqlen_k
    max_blocks = -(-tk // block_size)
    out = torch.full((batch, tq, hkv, max_blocks), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        seqs = _compressed_sequences(tq, _row_keys(tk, seqlens_k, b), kernel_size, kernel_stride, cu_seqlens,
                                     cu_seqlens_k)
        for qs, qe, cs, nk in seqs:
            nq = qe - qs
            nc = _num_windows(nk, kernel_size, kernel_stride)
            for i in range(nq):
                t = nk - nq + i
                num_visible = sum(1 for c in range(nc) if t >= c * kernel_stride + kernel_size - 1)
                for h in range(hkv):
                    heads = slice(h * group, (h + 1) * group)
                    keys = k_cmp[b, cs : cs + num_visible, h].double()  # [visible, D]
                    logits = keys @ q[b, qs + i, heads].double().T * scale  # [visible, G]
                    probs = torch.exp(logits - lse[b, qs + i, heads].double()).sum(-1).tolist()  # [visible]
                    for j in range(t // block_size + 1):
                        total = 0.0
                        for c in range(num_visible):
                            lo = max(c * kernel_stride, j * block_size)
                            hi = min(c * kernel_stride + kernel_size, (j + 1) * block_size)
                            if hi > lo:
                                total += probs[c] * (hi - lo) / kernel_stride
                        out[b, qs + i, h, j] = total
    return out


def select_blocks(
    q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks,
    scale=None, cu_seqlens=None, seqlen_k=None, cu_seqlens_k=None, seqlens_k=None,
):
    """Top-k key blocks per (query token, KV head): forced blocks first, then the highest ``block_scores``.

    Forced: ``j < init_blocks`` and the ``local_blocks`` blocks ending at ``t // block_size``; ties go to the
    lower j. Returns int32 [B, Tq, Hkv, topk], ascending, -1 last.
    """
    q, k_cmp, lse = q.detach(), k_cmp.detach(), lse.detach()
    scores = block_scores(q, k_cmp, lse, kernel_size, kernel_stride, block_size, scale, cu_seqlens, seqlen_k,
                          cu_seqlens_k, seqlens_k)
    batch, tq, hkv, _ = scores.shape
    out = torch.full((batch, tq, hkv, topk), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(tq):
            for h in range(hkv):
                candidates = [j for j, s in enumerate(scores[b, t, h].tolist()) if s != float("-inf")]
                if not candidates:
                    continue
                last_block = candidates[-1]
                row = scores[b, t, h].tolist()
                forced = {j for j in candidates if j < init_blocks or j > last_block - local_blocks}
                rest = sorted((j for j in candidates if j not in forced), key=lambda j: (-row[j], j))
                chosen = sorted(list(forced) + rest[: max(0, topk - len(forced))])
                out[b, t, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out.to(q.device)


def selected_attention(q, k, v, indices, block_size, scale=None, cu_seqlens=None, cu_seqlens_k=None, seqlens_k=None):
    """Query at position t, head h attends the keys ``s <= t`` of blocks ``indices[b, t, h // G, :]``.

    Block indices outside ``[0, t // block_size]`` count as empty. -> o [B, Tq, Hq, Dv], lse [B, Tq, Hq].
    """
    group = q.shape[2] // k.shape[2]

    def mask(query_pos, nk, b, qs):
        key_pos = torch.arange(nk, device=q.device)
        nq = query_pos.shape[0]
        idx = indices[b, qs : qs + nq].long()  # [nq, Hkv, topk]
        valid = (idx >= 0) & (idx <= (query_pos // block_size)[:, None, None])
        in_block = (idx.unsqueeze(-1) == (key_pos // block_size)) & valid.unsqueeze(-1)  # [nq, Hkv, topk, nk]
        chosen = in_block.any(dim=2).repeat_interleave(group, dim=1)  # [nq, Hq, nk]
        return chosen & (key_pos[None, None, :] <= query_pos[:, None, None])

    return _attention(q, k, v, scale, cu_seqlens, mask, cu_seqlens_k, seqlens_k)


def sliding_window_attention(q, k, v, window_size, scale=None, cu_seqlens=None, cu_seqlens_k=None, seqlens_k=None):
    """Query at position t attends keys ``t - window_size < s <= t``."""

    def mask(query_pos, nk, b, qs):
        key_pos = torch.arange(nk, device=q.device)
        diff = query_pos[:, None] - key_pos[None, :]
        return ((diff >= 0) & (diff < window_size))[:, None, :]

    return _attention(q, k, v, scale, cu_seqlens, mask, cu_seqlens_k, seqlens_k)


def gated_combine(gates, o_cmp, o_slc, o_win):
    """gates [B, T, Hq, 3] (already sigmoid) -> g0*o_cmp + g1*o_slc + g2*o_win."""
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win


def nsa_layer(x, params, config, cu_seqlens=None):
    """One NSA attention layer, forward only.

    params: the state dict of ``fsa_compile.FlashSparseAttention`` (names ``q_proj.weight`` ...);
    config: dict with num_heads, num_kv_heads, head_dim, kernel_size, kernel_stride, block_size, topk,
    init_blocks, local_blocks, window_size, rope_theta. x [B, T, hidden] -> [B, T, hidden].
    """
    c = config
    batch, total, _ = x.shape
    hq, hkv, d = c["num_heads"], c["num_kv_heads"], c["head_dim"]
    q = (x @ params["q_proj.weight"].T).view(batch, total, hq, d)
    k = (x @ params["k_proj.weight"].T).view(batch, total, hkv, d)
    v = (x @ params["v_proj.weight"].T).view(batch, total, hkv, d)
    gates = torch.sigmoid(x @ params["gate_proj.weight"].T + params["gate_proj.bias"]).view(batch, total, hq, 3)

    ks, stride = c["kernel_size"], c["kernel_stride"]
    k_cmp = compress(k, params["compress_key"], params["compress_key_pos"], ks, stride, cu_seqlens)
    v_cmp = compress(v, params["compress_value"], params["compress_value_pos"], ks, stride, cu_seqlens)

    # Positions restart at every sequence; a compressed key sits at the last token of its window.
    positions = torch.zeros(1 if cu_seqlens is not None else batch, total, dtype=torch.long)
    cmp_positions = torch.zeros(positions.shape[0], k_cmp.shape[1], dtype=torch.long)
    row = 0
    for start, end in _spans(total, cu_seqlens):
        positions[:, start:end] = torch.arange(end - start)
        n = _num_windows(end - start, ks, stride)
        cmp_positions[:, row : row + n] = torch.arange(n) * stride + ks - 1
        row += n
    theta = c["rope_theta"]
    q = rotary_embedding(q, positions.to(x.device), theta)
    k = rotary_embedding(k, positions.to(x.device), theta)
    k_cmp = rotary_embedding(k_cmp, cmp_positions.to(x.device), theta)

    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, ks, stride, None, cu_seqlens)
    indices = select_blocks(
        q, k_cmp, lse_cmp, ks, stride, c["block_size"], c["topk"], c["init_blocks"], c["local_blocks"],
        None, cu_seqlens,
    )
    o_slc, _ = selected_attention(q, k, v, indices, c["block_size"], None, cu_seqlens)
    o_win, _ = sliding_window_attention(q, k, v, c["window_size"], None, cu_seqlens)
    o = gated_combine(gates, o_cmp, o_slc, o_win).reshape(batch, total, hq * d)
    return o @ params["o_proj.weight"].T
