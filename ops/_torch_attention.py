"""Vectorised PyTorch attention, chunked over queries: the CPU kernel behind every attention op.

An op describes its sparsity with a list of ``Segment``s (``SequenceLayout.segments``) and a
``select_keys(segment, positions)`` callback that, for a chunk of queries at ``positions`` (a ``range`` of
positions within the sequence, so no device tensor is read on the host), returns
the keys the chunk may look at and a mask:

- ``slice(lo, hi)``: a span of keys shared by the whole chunk (window and compressed attention), or
- a long tensor ``[C, Hkv, S]`` of key rows per query (selected attention gathers its blocks).

Rows are relative to ``segment.key_start``; the mask broadcasts to ``[C, Hkv, G, S]``. Memory is bounded by
``CHUNK_ELEMENTS`` per chunk instead of growing as ``T * T``. Accumulation is float32 (float64 for float64
inputs); outputs are contiguous.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._layout import Segment

# Elements of the largest per-chunk score/gather tensor: 16M, i.e. 64 MiB in float32.
CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except for float64 inputs (CPU verification) where it stays float64."""
    return accumulation_dtype(dtype)


def chunk_size(elements_per_query: int, cap: int = 1024) -> int:
    return max(1, min(cap, CHUNK_ELEMENTS // max(1, elements_per_query)))


SelectKeys = Callable[[Segment, range], "tuple[slice | torch.Tensor, torch.Tensor]"]


def _scores(a, keys):
    """a [C, Hkv, G, D] @ keys^T -> [C, Hkv, G, S], keys [C or 1, Hkv, S, D]."""
    if keys.shape[0] == 1:  # a shared span: one matmul per head, not the span copied C times by broadcasting
        return torch.einsum("chgd,hsd->chgs", a, keys[0])
    return torch.matmul(a, keys.transpose(-1, -2))


def _weighted(p, values):
    """p [C, Hkv, G, S] @ values -> [C, Hkv, G, Dv], values [C or 1, Hkv, S, Dv]."""
    if values.shape[0] == 1:
        return torch.einsum("chgs,hsd->chgd", p, values[0])
    return torch.matmul(p, values)


def _probabilities(q, k, mask, scale, lse=None):
    acc = accumulation_dtype(q.dtype)
    scores = _scores(q.to(acc), k.to(acc)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    # Rows with no visible key: lse = -inf and p = 0, not NaN.
    probs = torch.exp(scores - lse.to(acc).masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    return probs, lse


def _gather_keys(x: torch.Tensor, b: int, segment: Segment, rows) -> torch.Tensor:
    """x [B, Tk, Hkv, D] -> [1, Hkv, S, D] for a slice, [C, Hkv, S, D] for a row tensor [C, Hkv, S]."""
    if isinstance(rows, slice):
        return x[b, segment.key_start + rows.start : segment.key_start + rows.stop].transpose(0, 1).unsqueeze(0)
    heads = torch.arange(x.shape[2], device=x.device).view(1, -1, 1)
    return x[b][segment.key_start + rows, heads]


def _chunks(segment: Segment, chunk: int):
    for start in range(segment.query_start, segment.query_end, chunk):
        end = min(start + chunk, segment.query_end)
        offset = segment.first_position - segment.query_start
        yield start, end, range(start + offset, end + offset)


def attention_forward(q, k, v, scale: float, segments, select_keys: SelectKeys, chunk: int):
    """-> o [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq] (float32; float64 for float64 inputs)."""
    batch, num_queries, hq, d = q.shape
    hkv = k.shape[2]
    o = q.new_zeros(batch, num_queries, hq, v.shape[-1])
    lse = q.new_full((batch, num_queries, hq), float("-inf"), dtype=lse_dtype(q.dtype))
    for segment in segments:
        b = segment.batch
        for start, end, positions in _chunks(segment, chunk):
            rows, mask = select_keys(segment, positions)
            qc = q[b, start:end].reshape(end - start, hkv, hq // hkv, d)
            kc, vc = _gather_keys(k, b, segment, rows), _gather_keys(v, b, segment, rows)
            probs, lse_c = _probabilities(qc, kc, mask, scale)
            o[b, start:end] = _weighted(probs, vc.to(probs.dtype)).reshape(end - start, hq, -1).to(q.dtype)
            lse[b, start:end] = lse_c.reshape(end - start, hq).to(lse.dtype)
    return o, lse


def attention_backward(do, dlse, q, k, v, o, lse, scale: float, segments, select_keys: SelectKeys, chunk: int):
    """Gradients for ``attention_forward``; dlse may be None. -> dq, dk, dv (contiguous, input dtypes)."""
    batch, _, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    heads = torch.arange(hkv, device=q.device).view(1, -1, 1)
    for segment in segments:
        b = segment.batch
        for start, end, positions in _chunks(segment, chunk):
            n = end - start
            rows, mask = select_keys(segment, positions)
            qc = q[b, start:end].reshape(n, hkv, group, d).to(acc)
            kc = _gather_keys(k, b, segment, rows).to(acc)
            vc = _gather_keys(v, b, segment, rows).to(acc)
            doc = do[b, start:end].reshape(n, hkv, group, -1).to(acc)
            probs, _ = _probabilities(qc, kc, mask, scale, lse[b, start:end].reshape(n, hkv, group))
            delta = (doc * o[b, start:end].reshape(n, hkv, group, -1).to(acc)).sum(-1, keepdim=True)
            if dlse is not None:
                delta = delta - dlse[b, start:end].reshape(n, hkv, group, 1).to(acc)
            ds = probs * (_scores(doc, vc) - delta)  # [C, Hkv, G, S]
            dq[b, start:end] = (_weighted(ds, kc) * scale).reshape(n, hq, d)
            if isinstance(rows, slice):
                keys = slice(segment.key_start + rows.start, segment.key_start + rows.stop)
                dk[b, keys] += torch.einsum("chgs,chgd->shd", ds, qc) * scale
                dv[b, keys] += torch.einsum("chgs,chgd->shd", probs, doc)
            else:
                # index_add_ on flat (key, head) rows: CPU index_put_(accumulate=True) is several times slower.
                index = ((segment.key_start + rows) * hkv + heads).flatten()
                dk_rows = torch.einsum("chgs,chgd->chsd", ds, qc).flatten(0, 2) * scale
                dv_rows = torch.einsum("chgs,chgd->chsd", probs, doc).flatten(0, 2)
                dk[b].view(-1, d).index_add_(0, index, dk_rows)
                dv[b].view(-1, dv.shape[-1]).index_add_(0, index, dv_rows)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
