"""Launchers of the masked flash-attention kernels (``_kernels/masked_attention.py``): compressed and window
attention.

Compressed and window attention both give each query token t a contiguous span of key rows
``[key_lo[t], key_hi[t])`` that only moves forward with t (``SequenceLayout.compressed_spans`` / ``window_spans``):
int64 [Tq], or [B, Tq] for a batch of caches of different fills (each batch row its own tables).
"""

from __future__ import annotations

import functools

import torch

from . import _settings
from ._kernels.masked_attention import (
    _masked_attention_bwd_dkdv_kernel,
    _masked_attention_bwd_dq_kernel,
    _masked_attention_fwd_kernel,
)
from ._launch import attention_config, cdiv, launch_fitting, launcher, next_power_of_2, softmax_backward_delta
from ._library import attention_outputs_like


def query_spans(key_lo, key_hi, num_keys: int):
    """The inverse tables: the tokens ``[query_lo[j], query_hi[j])`` that see key row j ([Tk], or [B, Tk] for
    per-row tables).

    Token t sees j iff ``key_lo[t] <= j < key_hi[t]``; both bounds are non-decreasing in t, so these are two
    searchsorted calls.
    """
    keys = torch.arange(num_keys, device=key_lo.device).expand(*key_lo.shape[:-1], num_keys).contiguous()
    return torch.searchsorted(key_hi, keys, right=True), torch.searchsorted(key_lo, keys, right=True)


def _span_tables(key_lo, key_hi):
    """int32 tables and their batch-row stride (0: one table for every row)."""
    stride = key_lo.shape[-1] if key_lo.dim() == 2 else 0
    return dict(key_lo=key_lo.to(torch.int32).contiguous(), key_hi=key_hi.to(torch.int32).contiguous(),
                span_stride=stride)


def _config(q, k, v):
    config = attention_config(q, k, v)
    return dict(config, GP=next_power_of_2(config["G"], minimum=1))


def _rows(settings, config):
    """BLOCK_M holds at least one token of all GP heads."""
    return dict(settings, BLOCK_M=max(settings["BLOCK_M"], config["GP"]))


def _key_splits(q, config, max_span: int | None) -> int:
    """Splits of each key span in the forward: enough programs to fill the GPU when there are few query tiles
    (decode: one token per row) and long spans (``max_span`` keys at most; None: never split)."""
    if max_span is None or q.device.type != "cuda" and _settings.get("masked_fwd_programs") is None:
        return 1
    tokens_per_program = _rows(_settings.get("masked_fwd", q.dtype, config["G"], config["D"])[0], config)["BLOCK_M"]
    programs = cdiv(q.shape[1], tokens_per_program // config["GP"]) * q.shape[0] * config["HKV"]
    target = _settings.get("masked_fwd_programs") or 2 * _multiprocessors(q.device)
    return max(1, min(cdiv(target, programs), max_span // _settings.get("masked_fwd_split_min_keys")))


@functools.cache
def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def masked_attention_forward(q, k, v, key_lo, key_hi, scale: float, max_span: int | None = None):
    """-> o [B, Tq, Hq, Dv] (q.dtype), lse [B, Tq, Hq] float32; a token with an empty span gets o=0, lse=-inf.

    max_span: a bound on the keys any token sees; with few query tiles, long spans are split over programs
    (split-K) and the float32 partials merged by log-sum-exp."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    batch, num_queries = q.shape[:2]
    config = _config(q, k, v)
    splits = _key_splits(q, config, max_span)
    if splits == 1:
        o, lse = attention_outputs_like(q, v.shape[-1])
    else:
        o = q.new_empty((splits, *q.shape[:3], v.shape[-1]), dtype=torch.float32)
        lse = q.new_empty((splits, *q.shape[:3]), dtype=torch.float32)
    spans = _span_tables(key_lo, key_hi)
    split_len = cdiv(max_span, splits) if splits > 1 else 0

    def launch(settings):
        settings = _rows(settings, config)
        grid = (cdiv(num_queries, settings["BLOCK_M"] // config["GP"]), batch * config["HKV"], splits)
        launcher(_masked_attention_fwd_kernel, grid)(
            q, k, v, **spans, o=o, lse=lse, scale=scale, Tq=num_queries, Tk=k.shape[1], split_len=split_len,
            **config, **settings,
        )

    if q.numel() > 0:
        launch_fitting("masked_fwd", launch, q, config)
    if splits == 1:
        return o, lse
    merged_lse = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - merged_lse).nan_to_num_(0.0)  # a token that sees nothing: exp(-inf - -inf)
    return (weights.unsqueeze(-1) * o).sum(0).to(q.dtype), merged_lse


def _query_chunks(max_tokens_per_key: int, tokens_per_step: int) -> tuple[int, int]:
    """(chunks, tokens per chunk, a multiple of tokens_per_step) covering max_tokens_per_key tokens."""
    most, least_tokens = _settings.get("masked_dkdv_max_chunks"), _settings.get("masked_dkdv_chunk_tokens")
    chunks = max(1, min(most, max_tokens_per_key // least_tokens))
    steps = cdiv(cdiv(max_tokens_per_key, chunks), tokens_per_step)
    return chunks, steps * tokens_per_step


def masked_attention_backward(do, dlse, q, k, v, o, lse, key_lo, key_hi, scale: float,
                              max_tokens_per_key: int | None = None):
    """Gradients of ``masked_attention_forward``; dlse may be None. -> dq, dk, dv (input dtypes).

    max_tokens_per_key: a bound on the tokens that see any one key (default: all Tq); it sets how many chunks
    the dk/dv kernel splits them into."""
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    batch, num_queries = q.shape[:2]
    num_keys = k.shape[1]
    config = _config(q, k, v)
    delta = softmax_backward_delta(do, o, dlse)
    query_lo, query_hi = query_spans(key_lo, key_hi, num_keys)
    tables = _span_tables(key_lo, key_hi)
    dq = torch.empty_like(q)
    max_tokens_per_key = num_queries if max_tokens_per_key is None else min(num_queries, max_tokens_per_key)
    common = dict(q=q, k=k, v=v, do=do, lse=lse.contiguous(), delta=delta, **tables, scale=scale, Tq=num_queries,
                  Tk=num_keys, **config)

    def launch_dq(settings):
        settings = _rows(settings, config)
        grid = (cdiv(num_queries, settings["BLOCK_M"] // config["GP"]), batch * config["HKV"])
        launcher(_masked_attention_bwd_dq_kernel, grid)(dq=dq, **common, **settings)

    def launch_dkdv(settings):
        settings = _rows(settings, config)
        chunks, chunk_tokens = _query_chunks(
            max_tokens_per_key + settings["BLOCK_N"] - 1, settings["BLOCK_M"] // config["GP"]
        )
        if chunks == 1:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        else:
            dk = k.new_empty((chunks, *k.shape), dtype=torch.float32)
            dv = v.new_empty((chunks, *v.shape), dtype=torch.float32)
        grid = (cdiv(num_keys, settings["BLOCK_N"]), batch * config["HKV"], chunks)
        launcher(_masked_attention_bwd_dkdv_kernel, grid)(
            query_lo=query_lo.to(torch.int32), query_hi=query_hi.to(torch.int32), dk=dk, dv=dv,
            chunk_tokens=chunk_tokens, query_span_stride=num_keys if query_lo.dim() == 2 else 0, **common, **settings,
        )
        if chunks == 1:
            return dk, dv
        return dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)

    if q.numel() > 0:
        launch_fitting("masked_bwd_dq", launch_dq, q, config)
    if k.numel() == 0:
        return dq, torch.empty_like(k), torch.empty_like(v)
    dk, dv = launch_fitting("masked_bwd_dkdv", launch_dkdv, q, config)
    return dq, dk, dv
