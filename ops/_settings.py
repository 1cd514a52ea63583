"""Tuned launch settings and constants of the Triton kernels: one table, read by the launchers.

A kernel's entry is a chain of settings: the tuned ones first, then smaller ones that the launcher tries in order
when a kernel needs more shared memory than the GPU has (float32 inputs, head dims above 128). An entry can be
given for one (dtype, G, D) and falls back to the kernel's general entry. The tune scripts in ``benchmarks/``
try candidates through ``override``, never by rewriting this module.

Where the numbers come from:
- ``selected_fsa_*``, ``selected_nsa``: ``benchmarks/tune_selected.py`` on an H100 (torch 2.11, triton 3.6),
  T = 64K, G in {1, 4}. block_m = query rows per dot; steps = dots per work item (a KV block is loaded once
  per block_m * steps rows). The backward keeps dk/dv accumulators in registers, so it wants more warps.
- ``masked_*`` (compressed and window attention), ``select_blocks``: ``benchmarks/tune_layer_kernels.py``,
  T = 64K, G in {1, 4}, bf16, H200. BLOCK_M = rows per program (tokens x G heads), BLOCK_N = keys per step; the
  dk/dv kernel owns BLOCK_N keys and steps over BLOCK_M rows of the tokens that see them.
"""

from __future__ import annotations

import contextlib

import torch

_LAUNCH_SETTINGS: dict[tuple, object] = {
    ("selected_fsa_fwd", None, None, None): (
        dict(block_m=64, steps=16, num_warps=4, num_stages=1),
        dict(block_m=16, steps=32, num_warps=4, num_stages=1),
    ),
    ("selected_fsa_bwd", None, None, None): (
        dict(block_m=128, steps=16, num_warps=8, num_stages=2),
        dict(block_m=64, steps=16, num_warps=4, num_stages=1),
        dict(block_m=16, steps=32, num_warps=4, num_stages=1),
    ),
    ("selected_nsa", None, None, None): (dict(num_warps=4, num_stages=2), dict(num_warps=4, num_stages=1)),
    ("masked_fwd", None, None, None): (
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
    ),
    ("masked_bwd_dq", None, None, None): (
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    ),
    ("masked_bwd_dkdv", None, None, None): (
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    ),
    # rows = tokens x GP heads of the group per program.
    ("select_blocks", None, None, None): (dict(rows=64, num_warps=4, num_stages=2),),
    # The FSA forward keeps one partial output per (token, selected block), topk times the output, and the
    # backward one partial dq; both run over chunks of tokens whose partials fit in this many bytes.
    ("fsa_partial_bytes", None, None, None): 2 << 30,
    # The masked dk/dv kernel splits the tokens that see one key tile into up to this many chunks of at least
    # this many tokens, each its own program (compressed attention: the spans are long and uneven).
    ("masked_dkdv_max_chunks", None, None, None): 8,
    ("masked_dkdv_chunk_tokens", None, None, None): 4096,
    # The masked forward splits long key spans (decode: one token per row) over programs until about this many
    # programs run (None: twice the GPU's multiprocessors; the interpreter never splits unless set), each split
    # at least this many keys.
    ("masked_fwd_programs", None, None, None): None,
    ("masked_fwd_split_min_keys", None, None, None): 512,
    # select_blocks of batched rows with at most this many queries (decode) runs as PyTorch: one batched matmul over
    # the compressed keys instead of one program per (row, KV head) walking them.
    ("select_blocks_few_queries", None, None, None): 16,
    # Compressed attention on CUDA runs cuDNN's dense causal attention over regrouped queries
    # (``_compressed_dense``) at every length for G <= max_group, from min_tokens tokens for larger G (None: never).
    # H200, bf16, D = 128, Hkv = 4, kernel 32/16, fwd / bwd ms, Triton vs cuDNN with the regrouping copies:
    # G = 1 32K 0.49/1.07 vs 0.30/0.81, 128K 3.16/10.5 vs 2.41/6.67; G = 4 8K 0.36/1.04 vs 0.21/0.57,
    # 32K 1.10/3.05 vs 1.06/2.85, 128K 12.5/39.6 vs 9.75/26.4; G = 16 32K 3.54/9.85 vs 4.15/11.2,
    # 64K 12.7/39.0 vs 12.0/32.9 (a probe of the two paths, 2026-12-02).
    ("compressed_dense", None, None, None): dict(max_group=4, min_tokens=65536),
    # The FSA index inversion's tables after the sort in three Triton launches, two zero fills and a cumsum instead
    # of about 25 torch ops (``_index_inversion._work_items_fused``; the host floor of eager calls). H200, bf16,
    # benchmarks/steady_state_ops.py, eager / CUDA-graph ms per call, torch ops vs fused: 16K G = 1 fwd
    # 1.07/0.49 vs 0.75/0.45, bwd 1.09/0.74 vs 0.89/0.70; 64K G = 4 fwd 5.39/5.21 vs 5.18/5.05, bwd 8.94/8.81 vs
    # 8.77/8.73 (2026-12-03). False: the torch ops (the A/B, and int64 keys, which always take them).
    ("fused_index_inversion", None, None, None): True,
    # Eager calls on CUDA replay a CUDA graph of the call from its second sighting (``_eager_graphs``), keeping at
    # most max_bytes of GPU memory in graphs (static inputs and pools); None: never. fsa_compile.set_eager_cuda_graphs
    # sets it.
    ("eager_cuda_graphs", None, None, None): dict(max_bytes=2 << 30),
    # The layer's plain-PyTorch glue (projections, compression, RoPE, the gated combination) in eager mode on CUDA
    # through torch.compile (``fsa_compile/_compiled_glue.py``; fsa_compile.set_compiled_glue). H200, bf16, 32K,
    # benchmarks/layer_setting_ab.py, eager layer fwd+bwd ms back to back, off vs on: G = 1 10.06 vs 9.00, G = 4
    # 21.51 vs 18.05 (2026-12-03).
    ("compiled_glue", None, None, None): True,
}
# Bumped by every change of the table: what was cached under other settings (eager CUDA graphs) is not reused.
_version = 0


def version() -> int:
    return _version


def get(name: str, dtype: torch.dtype | None = None, group: int | None = None, head_dim: int | None = None):
    """The setting ``name`` for (dtype, G, D): the most specific entry of the table."""
    for key in ((name, dtype, group, head_dim), (name, dtype, group, None), (name, dtype, None, None),
                (name, None, None, None)):
        if key in _LAUNCH_SETTINGS:
            return _LAUNCH_SETTINGS[key]
    raise KeyError(f"no launch setting named {name!r}")


@contextlib.contextmanager
def override(name: str, value, dtype: torch.dtype | None = None, group: int | None = None,
             head_dim: int | None = None):
    """Use ``value`` for ``name`` (for one dtype/G/D, or all) inside the block; a chain of settings for a kernel,
    a number for a constant. For tune scripts and tests."""
    global _version
    key = (name, dtype, group, head_dim)
    get(name)  # a typo must not pass silently
    missing = object()
    previous = _LAUNCH_SETTINGS.get(key, missing)
    _LAUNCH_SETTINGS[key] = value
    _version += 1
    try:
        yield
    finally:
        if previous is missing:
            del _LAUNCH_SETTINGS[key]
        else:
            _LAUNCH_SETTINGS[key] = previous
        _version += 1


def replace(name: str, value) -> None:
    """Make ``value`` the general entry of ``name`` (for all dtypes, G and D) from now on."""
    global _version
    get(name)
    _LAUNCH_SETTINGS[(name, None, None, None)] = value
    _version += 1


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: IEEE-exact float32 dots (no TF32) for float32 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"
