"""Launchers of the masked flash-attention kernels (``_kernels/masked_attention.py``) and their key-span tables.

Compressed and window attention both give each query token t a contiguous span of key rows
``[key_lo[t], key_hi[t])`` that only moves forward with t. The tables are built on the device from shapes and
``cu_seqlens`` with a handful of torch ops: no host sync, so the ops stay capturable by CUDA graphs.
"""

from __future__ import annotations

import torch
import triton

from ._kernels.common import next_power_of_2
from ._kernels.masked_attention import (
    _masked_attention_bwd_dkdv_kernel,
    _masked_attention_bwd_dq_kernel,
    _masked_attention_fwd_kernel,
)
from ._launch import fitted_kernel, fitting_key, launch_fitting
from ._library import attention_outputs_like, softmax_backward_delta
from ._sequences import compressed_sequences, token_sequences

# Rows per program = BLOCK_M (tokens x G heads), keys per step = BLOCK_N. Smaller settings follow for GPUs or
# dtypes whose shared memory does not fit the first ones.
# Tuned with benchmarks/tune_layer_kernels.py (T=64K, G in {1, 4}, bf16, H200).
FORWARD_SETTINGS = (
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
)
# Backward: the dq kernel tiles like the forward (BLOCK_M rows per program, BLOCK_N keys per step); the dk/dv
# kernel owns BLOCK_N keys and steps over BLOCK_M rows of the tokens that see them.
DQ_SETTINGS = (
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
)
DKDV_SETTINGS = (
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
)


def window_spans(num_queries: int, num_keys: int, window_size: int, cu_seqlens, device):
    """Key spans of sliding-window attention: keys ``t - window_size < s <= t`` of t's own sequence."""
    position, _, first_key = token_sequences(num_queries, num_keys, cu_seqlens, device)
    key_lo = first_key + (position - window_size + 1).clamp(min=0)
    return key_lo, first_key + position + 1


def compressed_spans(num_queries: int, seqlen_k: int, kernel_size: int, kernel_stride: int, cu_seqlens, device):
    """Key spans of compressed attention: compressed keys i with ``i*kernel_stride + kernel_size - 1 <= t``.

    With ``cu_seqlens`` the compressed sequences are packed (``fsa_compile.compress``'s layout), so a
    sequence's first compressed row is the sum of the compressed lengths before it.
    """
    position, sequence, _ = token_sequences(num_queries, seqlen_k, cu_seqlens, device)
    visible = torch.where(position >= kernel_size - 1, (position - kernel_size + 1) // kernel_stride + 1, 0)
    if sequence is None:
        return torch.zeros_like(visible), visible
    first_row = compressed_sequences(cu_seqlens, num_queries, kernel_size, kernel_stride)[1][sequence]
    return first_row, first_row + visible


def query_spans(key_lo, key_hi, num_keys: int):
    """The inverse tables: the tokens ``[query_lo[j], query_hi[j])`` that see key row j.

    Token t sees j iff ``key_lo[t] <= j < key_hi[t]``; both bounds are non-decreasing in t, so these are two
    searchsorted calls.
    """
    keys = torch.arange(num_keys, device=key_lo.device)
    return torch.searchsorted(key_hi, keys, right=True), torch.searchsorted(key_lo, keys, right=True)


def _config(q, k, v):
    hq, hkv = q.shape[2], k.shape[2]
    group = hq // hkv
    return dict(
        HQ=hq, HKV=hkv, G=group, GP=triton.next_power_of_2(group), D=q.shape[-1], DV=v.shape[-1],
        BLOCK_D=next_power_of_2(q.shape[-1]), BLOCK_DV=next_power_of_2(v.shape[-1]),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _rows(settings, config):
    """BLOCK_M holds at least one token of all GP heads."""
    return dict(settings, BLOCK_M=max(settings["BLOCK_M"], config["GP"]))


def masked_attention_forward(q, k, v, key_lo, key_hi, scale: float):
    """-> o [B, Tq, Hq, Dv] (q.dtype), lse [B, Tq, Hq] float32; a token with an empty span gets o=0, lse=-inf."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    batch, num_queries = q.shape[:2]
    config = _config(q, k, v)
    o, lse = attention_outputs_like(q, v.shape[-1])
    spans = dict(key_lo=key_lo.to(torch.int32), key_hi=key_hi.to(torch.int32))

    def launch(settings):
        settings = _rows(settings, config)
        grid = (triton.cdiv(num_queries, settings["BLOCK_M"] // config["GP"]), batch * config["HKV"])
        fitted_kernel(_masked_attention_fwd_kernel, grid)(
            q, k, v, **spans, o=o, lse=lse, scale=scale, Tq=num_queries, Tk=k.shape[1], **config, **settings
        )

    if q.numel() > 0:
        launch_fitting(launch, FORWARD_SETTINGS, fitting_key("masked_fwd", q, config))
    return o, lse


# The dk/dv kernel splits the tokens that see one key tile into up to DKDV_MAX_CHUNKS chunks of at least
# DKDV_CHUNK_TOKENS tokens, each its own program (compressed attention: the spans are long and uneven).
DKDV_CHUNK_TOKENS = 4096
DKDV_MAX_CHUNKS = 8


def _query_chunks(max_tokens_per_key: int, tokens_per_step: int) -> tuple[int, int]:
    """(chunks, tokens per chunk, a multiple of tokens_per_step) covering max_tokens_per_key tokens."""
    chunks = max(1, min(DKDV_MAX_CHUNKS, max_tokens_per_key // DKDV_CHUNK_TOKENS))
    steps = triton.cdiv(triton.cdiv(max_tokens_per_key, chunks), tokens_per_step)
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
    tables = dict(key_lo=key_lo.to(torch.int32), key_hi=key_hi.to(torch.int32))
    dq = torch.empty_like(q)
    max_tokens_per_key = num_queries if max_tokens_per_key is None else min(num_queries, max_tokens_per_key)
    common = dict(q=q, k=k, v=v, do=do, lse=lse.contiguous(), delta=delta, **tables, scale=scale, Tq=num_queries,
                  Tk=num_keys, **config)

    def launch_dq(settings):
        settings = _rows(settings, config)
        grid = (triton.cdiv(num_queries, settings["BLOCK_M"] // config["GP"]), batch * config["HKV"])
        fitted_kernel(_masked_attention_bwd_dq_kernel, grid)(dq=dq, **common, **settings)

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
        grid = (triton.cdiv(num_keys, settings["BLOCK_N"]), batch * config["HKV"], chunks)
        fitted_kernel(_masked_attention_bwd_dkdv_kernel, grid)(
            query_lo=query_lo.to(torch.int32), query_hi=query_hi.to(torch.int32), dk=dk, dv=dv,
            chunk_tokens=chunk_tokens, **common, **settings,
        )
        if chunks == 1:
            return dk, dv
        return dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)

    if q.numel() > 0:
        launch_fitting(launch_dq, DQ_SETTINGS, fitting_key("masked_bwd_dq", q, config))
    if k.numel() == 0:
        return dq, torch.empty_like(k), torch.empty_like(v)
    dk, dv = launch_fitting(launch_dkdv, DKDV_SETTINGS, fitting_key("masked_bwd_dkdv", q, config))
    return dq, dk, dv
