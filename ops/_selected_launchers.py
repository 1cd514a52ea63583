"""Launchers of selected attention's Triton kernels, and the table that picks one.

``KERNELS`` maps an ``impl`` name to ``(applies_when, forward, backward)``; ``impl="auto"`` takes the first row whose
``applies_when(call)`` holds, so a new kernel (a decode kernel, say) is one new row. Both kernels take
``query_rows`` / ``sequence_starts`` from ``SequenceLayout``.

- ``nsa``: query-centric (vanilla NSA, ``_kernels/selected_nsa.py``), one program per (token, KV head) with the
  group's heads padded to 16 rows per dot. Its backward adds dk/dv with atomics per (query, block).
- ``fsa``: KV-block-centric (``_kernels/selected_fsa.py``) over work items of the inverted indices
  (``_index_inversion.py``); partial outputs per (token, slot) merged by log-sum-exp, over chunks of tokens whose
  partials fit ``fsa_partial_bytes``. Its backward has a deterministic mode.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import _settings
from ._index_inversion import invert_indices
from ._kernels.selected_fsa import (
    _selected_attention_fsa_bwd_kernel,
    _selected_attention_fsa_dkdv_sum_kernel,
    _selected_attention_fsa_dq_sum_kernel,
    _selected_attention_fsa_fwd_kernel,
    _selected_attention_fsa_merge_kernel,
)
from ._kernels.selected_nsa import _selected_attention_nsa_bwd_kernel, _selected_attention_nsa_fwd_kernel
from ._launch import attention_config, cdiv, launch_fitting, launcher, next_power_of_2, softmax_backward_delta
from ._layout import SequenceLayout
from ._library import attention_outputs_like, resolve_scale


class Call(NamedTuple):
    """What ``applies_when`` sees of a call."""

    group: int
    num_queries: int
    backward: bool
    deterministic: bool  # torch.use_deterministic_algorithms(True)


class Kernel(NamedTuple):
    applies_when: Callable[[Call], bool]
    # Inputs contiguous; config and tables from _launch_settings.
    forward: Callable  # (q, k, v, indices, layout, block_size, scale, config, tables) -> (o, lse)
    # (do, q, k, v, lse, delta, indices, layout, block_size, scale, config, tables, dq, dk, dv, deterministic):
    # writes dq, adds to the float32 dk, dv.
    backward: Callable


def _launch_settings(q, k, v, indices, block_size, layout):
    config = dict(attention_config(q, k, v), TOPK=indices.shape[-1], BS=block_size,
                  BLOCK_S=next_power_of_2(block_size))
    tables = dict(query_rows=layout.query_rows.to(torch.int32),
                  sequence_starts=layout.query_key_starts.to(torch.int32))
    return config, tables


# ---- NSA ---------------------------------------------------------------------------------------------------

def _nsa_forward(q, k, v, indices, layout, block_size, scale, config, tables):
    o, lse = attention_outputs_like(q, v.shape[-1])
    grid, num_queries = (q.shape[1], q.shape[0] * config["HKV"]), q.shape[1]
    launch_fitting("selected_nsa", lambda settings: launcher(_selected_attention_nsa_fwd_kernel, grid)(
        q=q, k=k, v=v, indices=indices, **tables, o=o, lse=lse, scale=scale, Tq=num_queries, Tk=k.shape[1],
        BLOCK_G=next_power_of_2(config["G"]), **config, **settings,
    ), q, config)
    return o, lse


def _nsa_backward(do, q, k, v, lse, delta, indices, layout, block_size, scale, config, tables, dq, dk, dv,
                  deterministic):
    grid = (q.shape[1], q.shape[0] * config["HKV"])
    launch_fitting("selected_nsa", lambda settings: launcher(_selected_attention_nsa_bwd_kernel, grid)(
        q=q, k=k, v=v, do=do, lse=lse, delta=delta, indices=indices, **tables, dq=dq, dk=dk, dv=dv, scale=scale,
        Tq=q.shape[1], Tk=k.shape[1], BLOCK_G=next_power_of_2(config["G"]), **config, **settings,
    ), q, dict(config, backward=True))


# ---- FSA ---------------------------------------------------------------------------------------------------

def _token_chunks(indices, bytes_per_entry):
    """(first_token, indices [N, Hkv, topk]) chunks of the flattened tokens of ``indices [B, Tq, Hkv, topk]`` whose
    per-entry partial buffers (``bytes_per_entry`` each) fit in ``fsa_partial_bytes``."""
    batch, num_queries, hkv, topk = indices.shape
    flat = indices.view(batch * num_queries, hkv, topk)
    chunk = max(1, _settings.get("fsa_partial_bytes") // max(1, hkv * topk * bytes_per_entry))
    for first_token in range(0, flat.shape[0], chunk):
        yield first_token, flat[first_token : first_token + chunk]


def _fsa_work(k, indices, first_token, num_queries, layout, tables, block_size, group, settings):
    """Inverted indices of one chunk, the meta-parameters of its launch and the entries' selection keys."""
    gp = next_power_of_2(group, minimum=1)
    block_m = max(settings["block_m"], gp)
    items, keys = invert_indices(
        indices, first_token, num_queries, tables["query_rows"], tables["sequence_starts"], block_size, k.shape[1],
        k.shape[0], layout.num_sequences if layout.packed else 1, block_m // gp * settings["steps"],
    )
    meta = dict(GP=gp, BLOCK_M=block_m, num_warps=settings["num_warps"], num_stages=settings["num_stages"])
    return items._asdict(), meta, keys


def _fsa_forward(q, k, v, indices, layout, block_size, scale, config, tables):
    o, lse = attention_outputs_like(q, v.shape[-1])
    group, hkv, topk = config["G"], config["HKV"], config["TOPK"]
    for first_token, chunk in _token_chunks(indices, group * (v.shape[-1] * q.element_size() + 4)):
        o_partial = q.new_empty(chunk.numel(), group, v.shape[-1])
        lse_partial = torch.full((chunk.numel(), group), float("-inf"), dtype=torch.float32, device=q.device)

        def launch(settings):
            work, meta, _ = _fsa_work(k, chunk, first_token, q.shape[1], layout, tables, block_size, group, settings)
            launcher(_selected_attention_fsa_fwd_kernel, (work["item_keys"].shape[0],))(
                q=q, k=k, v=v, **work, query_rows=tables["query_rows"], o_partial=o_partial, lse_partial=lse_partial,
                scale=scale, first_token=first_token, Tq=q.shape[1], Tk=k.shape[1], **config, **meta,
            )
            return meta

        gp = launch_fitting("selected_fsa_fwd", launch, q, config)["GP"]
        block_r = max(16, gp)
        launcher(_selected_attention_fsa_merge_kernel, (cdiv(chunk.shape[0], block_r // gp), hkv))(
            o_partial=o_partial, lse_partial=lse_partial, o=o, lse=lse, first_token=first_token,
            num_tokens=chunk.shape[0], HKV=hkv, G=group, GP=gp, TOPK=topk, DV=config["DV"], BLOCK_R=block_r,
            BLOCK_DV=config["BLOCK_DV"],
        )
    return o, lse


def _fsa_backward(do, q, k, v, lse, delta, indices, layout, block_size, scale, config, tables, dq, dk, dv,
                  deterministic):
    """Writes dq; adds to dk, dv (float32) with atomics, or deterministically through per-work-item partials (float32
    [items, BLOCK_S, BLOCK_D + BLOCK_DV]) summed per block in item order."""
    group, hkv = config["G"], config["HKV"]
    # The deterministic dk/dv sum reads the sequence start of every key row.
    key_starts = layout.key_starts.to(torch.int32) if deterministic else None
    for first_token, chunk in _token_chunks(indices, group * q.shape[-1] * q.element_size()):
        dq_partial = q.new_empty(chunk.numel(), group, q.shape[-1])

        def launch(settings):
            work, meta, keys = _fsa_work(k, chunk, first_token, q.shape[1], layout, tables, block_size, group,
                                         settings)
            num_items = work["item_keys"].shape[0]
            dk_partial, dv_partial = dk, dv  # unused without DETERMINISTIC
            if deterministic:
                dk_partial = dk.new_empty(num_items, config["BLOCK_S"], config["BLOCK_D"])
                dv_partial = dv.new_empty(num_items, config["BLOCK_S"], config["BLOCK_DV"])
            launcher(_selected_attention_fsa_bwd_kernel, (num_items,))(
                q=q, k=k, v=v, do=do, lse=lse, delta=delta, **work, query_rows=tables["query_rows"],
                dq_partial=dq_partial, dk=dk, dv=dv, dk_partial=dk_partial, dv_partial=dv_partial, scale=scale,
                first_token=first_token, Tq=q.shape[1], Tk=k.shape[1], **config, **meta, DETERMINISTIC=deterministic,
            )
            if deterministic:
                launcher(_selected_attention_fsa_dkdv_sum_kernel, (num_items,))(
                    dk_partial=dk_partial, dv_partial=dv_partial, item_keys=work["item_keys"],
                    item_lengths=work["item_lengths"], sequence_starts=key_starts, dk=dk, dv=dv,
                    num_items=num_items, Tk=k.shape[1], HKV=hkv, BS=block_size, D=config["D"], DV=config["DV"],
                    BLOCK_S=config["BLOCK_S"], BLOCK_D=config["BLOCK_D"], BLOCK_DV=config["BLOCK_DV"],
                    VARLEN=layout.packed,
                )
            return meta["GP"], keys

        gp, keys = launch_fitting("selected_fsa_bwd", launch, q, dict(config, DETERMINISTIC=deterministic))
        block_r = max(16, gp)
        launcher(_selected_attention_fsa_dq_sum_kernel, (cdiv(chunk.shape[0], block_r // gp), hkv))(
            dq_partial=dq_partial, selection_keys=keys, dq=dq, first_token=first_token, num_tokens=chunk.shape[0],
            unread_key=k.shape[0] * hkv * k.shape[1], HKV=hkv, G=group, GP=gp, TOPK=config["TOPK"], D=config["D"],
            BLOCK_R=block_r, BLOCK_D=config["BLOCK_D"],
        )


# ---- the table ---------------------------------------------------------------------------------------------

# Measured on an H100 (benchmarks/bench_selected.py). Forward: the NSA kernel pads each group to 16 rows per dot,
# so at small G most of its tensor-core work is padding and FSA wins; at G >= 16 the padding is gone and NSA, which
# needs no index inversion or partial outputs, is faster (G = 16: 17.5 vs 22.5 ms at T = 64K; G = 4: FSA 6.2 vs
# 17 ms). Decode-sized calls (few queries) go to NSA. Backward: always FSA; the NSA backward was 2x-30x slower at
# every G.
KERNELS: dict[str, Kernel] = {
    "nsa": Kernel(lambda call: not call.backward and (call.group >= 16 or call.num_queries < 64),
                  _nsa_forward, _nsa_backward),
    "fsa": Kernel(lambda call: True, _fsa_forward, _fsa_backward),
}
# The kernel whose backward has a deterministic mode: it runs under torch.use_deterministic_algorithms(True)
# whatever impl asks.
DETERMINISTIC_BACKWARD = "fsa"
IMPLS = ("auto", *sorted(KERNELS))


def choose_kernel(impl: str, call: Call) -> str:
    """The kernel that runs ``call`` for ``impl`` ("auto": the first row of KERNELS that applies)."""
    if call.backward and call.deterministic:
        return DETERMINISTIC_BACKWARD
    if impl != "auto":
        return impl
    return next(name for name, kernel in KERNELS.items() if kernel.applies_when(call))


def forward(q, k, v, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k=None, seqlens_k=None):
    # The kernel is chosen by the queries per sequence (Tq), also for a batch of caches run as one packed row.
    call = Call(q.shape[2] // k.shape[2], q.shape[1], backward=False, deterministic=False)
    shape = (*q.shape[:3], v.shape[-1])
    layout = SequenceLayout.of(q, k.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k)
    layout, (q, k, v, indices) = layout.for_kernels(*(x.contiguous() for x in (q, k, v, indices)))
    config, tables = _launch_settings(q, k, v, indices, block_size, layout)
    kernel = KERNELS[choose_kernel(impl, call)]
    o, lse = kernel.forward(q, k, v, indices, layout, block_size, resolve_scale(scale, q.shape[-1]), config, tables)
    return o.view(shape), lse.view(shape[:3])


def backward(do, dlse, q, k, v, o, lse, indices, block_size, scale, cu_seqlens, impl, cu_seqlens_k=None,
             seqlens_k=None):
    deterministic = torch.are_deterministic_algorithms_enabled()
    call = Call(q.shape[2] // k.shape[2], q.shape[1], backward=True, deterministic=deterministic)
    shapes = (q.shape, k.shape, v.shape)
    layout = SequenceLayout.of(q, k.shape[1], cu_seqlens, cu_seqlens_k, seqlens_k)
    layout, (q, k, v, indices, do, o, lse, dlse) = layout.for_kernels(
        *(x.contiguous() for x in (q, k, v, indices, do, o, lse)), dlse)
    config, tables = _launch_settings(q, k, v, indices, block_size, layout)
    kernel = KERNELS[choose_kernel(impl, call)]
    delta = softmax_backward_delta(do, o, dlse)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    kernel.backward(do, q, k, v, lse, delta, indices, layout, block_size, resolve_scale(scale, q.shape[-1]), config,
                    tables, dq, dk, dv, deterministic)
    return tuple(grad.view(shape) for grad, shape in zip((dq, dk.to(k.dtype), dv.to(v.dtype)), shapes))
