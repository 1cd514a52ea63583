import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops import _launch, _selected_launchers, _settings
from fsa_compile.ops._selected_launchers import Call, choose_kernel
from tests._testing import (
    DEVICE, RATIO, SELECTED_PATHS, assert_close, case_params, check_attention, check_on_query_suffix, grads,
    deterministic_algorithms, make_cu_seqlens, make_indices, make_qkv, selected_attention_path,
)

BLOCKS = [(16, 3), (32, 2), (64, 4)]  # (block_size, topk); the last asks for more blocks than T=63..161 has


@pytest.fixture(params=SELECTED_PATHS)
def impl(request):
    with selected_attention_path(request.param) as impl:
        yield impl


@pytest.mark.parametrize("block_size,topk", BLOCKS, ids=lambda x: str(x))
@pytest.mark.parametrize("case,dtype", case_params())
def test_matches_reference(case, dtype, block_size, topk, impl):
    if DEVICE == "cpu" and impl == "nsa" and dtype == torch.float16:
        # ~10 s each under the interpreter (a quarter of CI's time in this file); the GPU runs them.
        pytest.skip("the NSA kernel's float16 cases run on the GPU only; float32 covers the kernel here")
    q, k, v, cu = case.inputs(dtype)
    indices = make_indices(case.batch, case.num_queries, case.num_keys, case.hkv, block_size, topk, cu)
    out = torch.ops.fsa.selected_attention(q, k, v, indices, block_size, None, cu, impl)
    check_attention(
        out, lambda q, k, v: reference.selected_attention(q, k, v, indices, block_size, None, cu), (q, k, v), dtype
    )


@pytest.mark.parametrize("block_size,topk,g,d", [(8, 4, 3, 20), (64, 2, 16, 32), (20, 3, 1, 8), (64, 2, 2, 256)],
                         ids=["G3-D20-bs8", "G16-D32-bs64", "G1-D8-bs20", "G2-D256-bs64"])
def test_odd_groups_head_dims_and_block_sizes(block_size, topk, g, d, impl):
    q, k, v = make_qkv(2, 70, 90, 2 * g, 2, d, min(d + 4, 256))
    indices = make_indices(2, 70, 90, 2, block_size, topk)
    out = torch.ops.fsa.selected_attention(q, k, v, indices, block_size, 0.25, None, impl)
    check_attention(
        out, lambda q, k, v: reference.selected_attention(q, k, v, indices, block_size, 0.25), (q, k, v), torch.float32
    )


def test_out_of_range_indices_are_ignored(impl):
    q, k, v = make_qkv(2, 50, 70, 4, 2, 16)
    indices = make_indices(2, 50, 70, 2, 8, 4)
    # Poison the empty slots with blocks past the end (9 * 8 > 69), far out of range and negative values.
    junk = torch.tensor([999, 9, -5, 2**30], dtype=torch.int32, device=DEVICE)
    poisoned = torch.where(indices < 0, junk.expand_as(indices), indices)
    clean_o, clean_lse = torch.ops.fsa.selected_attention(q, k, v, indices, 8, None, None, impl)
    o, lse = torch.ops.fsa.selected_attention(q, k, v, poisoned, 8, None, None, impl)
    torch.testing.assert_close(o, clean_o, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, clean_lse, rtol=0, atol=1e-6)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    for got, want in zip(grads((o, lse), (q, k, v), (do, dlse)), grads((clean_o, clean_lse), (q, k, v), (do, dlse))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_block_repeated_in_a_row_counts_once(impl):
    """Indices that name a block twice (against the contract, which select_blocks keeps) still mean the set of
    blocks, as in the reference, forward and backward."""
    q, k, v = make_qkv(2, 45, 50, 4, 2, 16)
    indices = make_indices(2, 45, 50, 2, 8, 5)
    # Repeats next to each other, far apart and in unsorted rows, over valid blocks and -1 slots alike.
    repeated = torch.stack([indices[..., 0], indices[..., 0], indices[..., 1], indices[..., 0], indices[..., 1]], -1)
    shuffled = repeated[..., torch.tensor([3, 1, 4, 0, 2], device=DEVICE)]
    repeated = torch.where(torch.rand(repeated.shape[:3], device=DEVICE).unsqueeze(-1) < 0.5, repeated, shuffled)
    out = torch.ops.fsa.selected_attention(q, k, v, repeated, 8, None, None, impl)
    check_attention(out, lambda q, k, v: reference.selected_attention(q, k, v, repeated, 8), (q, k, v), torch.float32)


def test_all_blocks_selected_is_causal_attention():
    q, k, v = make_qkv(1, 45, 45, 4, 1, 16, dtype=torch.float64)
    indices = torch.arange(3, dtype=torch.int32, device=DEVICE).expand(1, 45, 1, 3).contiguous()
    o, _ = fsa_compile.selected_attention(q, k, v, indices, 16)
    k_rep, v_rep = (x.repeat_interleave(4, dim=2) for x in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k_rep.transpose(1, 2), v_rep.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(o, expected)


@pytest.mark.parametrize("num_queries,topk", [(10, 2), (10, 0), (0, 2)], ids=["all-empty", "topk-0", "no-tokens"])
def test_no_block_gives_zero_and_minus_inf(impl, num_queries, topk):
    q, k, v = make_qkv(1, num_queries, num_queries, 2, 1, 8)
    indices = torch.full((1, num_queries, 1, topk), -1, dtype=torch.int32, device=DEVICE)
    o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, 4, None, None, impl)
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.equal(o, torch.zeros_like(o)) and torch.all(lse == float("-inf"))
    (o * torch.randn_like(o)).sum().backward()
    for x in (q, k, v):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradcheck():
    q, k, v = make_qkv(1, 11, 14, 2, 1, 4, 3, dtype=torch.float64)
    indices = make_indices(1, 11, 14, 1, 4, 2)
    torch.autograd.gradcheck(lambda q, k, v: fsa_compile.selected_attention(q, k, v, indices, 4), (q, k, v))


def test_auto_heuristic():
    forward = dict(backward=False, deterministic=False)
    assert choose_kernel("auto", Call(1, 4096, **forward)) == "fsa"
    assert choose_kernel("auto", Call(16, 4096, **forward)) == "nsa"
    assert choose_kernel("auto", Call(1, 1, **forward)) == "nsa"  # decode
    assert choose_kernel("auto", Call(16, 4096, backward=True, deterministic=False)) == "fsa"
    assert choose_kernel("nsa", Call(1, 4096, **forward)) == "nsa"
    assert choose_kernel("fsa", Call(16, 1, **forward)) == "fsa"
    # Deterministic backward: the FSA kernel whatever impl asks.
    assert choose_kernel("nsa", Call(16, 4096, backward=True, deterministic=True)) == "fsa"
    assert choose_kernel("nsa", Call(16, 4096, backward=True, deterministic=False)) == "nsa"


def test_impl_argument_is_validated():
    q, k, v = make_qkv(1, 8, 8, 2, 1, 8)
    indices = torch.zeros(1, 8, 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'fsa', 'nsa'\), got 'flash'"):
        torch.ops.fsa.selected_attention(q, k, v, indices, 4, None, None, "flash")


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(varlen, impl):
    q, k, v = make_qkv(1, 29, 29, 4, 2, 16)
    cu = torch.tensor([0, 13, 29], dtype=torch.int32, device=DEVICE) if varlen else None
    indices = make_indices(1, 29, 29, 2, 4, 3, cu)
    torch.library.opcheck(torch.ops.fsa.selected_attention, (q, k, v, indices, 4, None, cu, impl))
    o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, 4, None, cu, impl)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(
            torch.ops.fsa.selected_attention_backward,
            (torch.randn_like(o), dlse, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), indices, 4,
             None, cu, impl),
        )


@pytest.mark.parametrize("budget", [1, 3000], ids=["one-token-chunks", "chunks-across-batch-rows"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fsa_in_token_chunks(budget, varlen):
    """A small partial-buffer budget splits the FSA forward and backward into chunks of tokens, also across batch
    rows and sequences."""
    batch, cu = (1, torch.tensor([0, 9, 23], dtype=torch.int32, device=DEVICE)) if varlen else (2, None)
    q, k, v = make_qkv(batch, 23, 30 if cu is None else 23, 4, 2, 16)
    indices = make_indices(batch, 23, 30 if cu is None else 23, 2, 8, 3, cu)
    with _settings.override("fsa_partial_bytes", budget), selected_attention_path("fsa") as impl:
        out = torch.ops.fsa.selected_attention(q, k, v, indices, 8, None, cu, impl)
        check_attention(
            out, lambda q, k, v: reference.selected_attention(q, k, v, indices, 8, cu_seqlens=cu), (q, k, v),
            torch.float32,
        )


def realistic_indices(batch, num_queries, hkv, block_size, topk):
    """Block 0 and the two blocks ending at each query's own block, then random causal blocks (vectorised)."""
    num_blocks = -(-num_queries // block_size)
    blocks = torch.arange(num_blocks, device=DEVICE)
    last = (torch.arange(num_queries, device=DEVICE) // block_size).view(-1, 1, 1)
    score = torch.rand(batch, num_queries, hkv, num_blocks, device=DEVICE)
    score = torch.where((blocks == 0) | (blocks == last) | (blocks == last - 1), 2.0, score)
    value, chosen = score.masked_fill(blocks > last, -1.0).topk(min(topk, num_blocks), dim=-1)
    chosen = torch.where(value < 0, num_blocks, chosen).sort(-1).values
    return torch.where(chosen == num_blocks, -1, chosen).to(torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("num_queries,group", [(4096, 1), (4096, 4), (16384, 1), (16384, 4)], ids=lambda x: str(x))
def test_realistic_sizes_bf16(num_queries, group, impl):
    """T = 4K..16K, bf16, D = 128, block 64, top-16. The oracle sees the last 384 queries only: the loss is put on
    those rows, so every gradient (dk, dv included) must match the reference run on that suffix."""
    hkv, tail = 2, 384
    q, k, v = make_qkv(1, num_queries, num_queries, hkv * group, hkv, 128, dtype=torch.bfloat16)
    indices = realistic_indices(1, num_queries, hkv, 64, 16)
    o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, 64, None, None, impl)
    check_on_query_suffix(
        o, lse, (q, k, v), lambda q, k, v: reference.selected_attention(q, k, v, indices[:, -tail:], 64), tail
    )


def test_launch_falls_back_once_when_settings_do_not_fit():
    import triton

    tried = []

    def launch(settings):
        tried.append(settings["name"])
        if settings["name"] == "big":
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
        return settings["name"]

    chain = ({"name": "big"}, {"name": "medium"}, {"name": "small"})
    q, config = torch.empty(1, device=DEVICE), dict(G=3, D=5, test_only=object())
    with _settings.override("selected_nsa", chain, dtype=q.dtype, group=3, head_dim=5):
        assert _launch.launch_fitting("selected_nsa", launch, q, config) == "medium"
        assert _launch.launch_fitting("selected_nsa", launch, q, config) == "medium"
    assert tried == ["big", "medium", "medium"]  # the misfit is not retried


DETERMINISTIC_CASES = [
    pytest.param(1, 100, 4, 2, 32, 16, 3, None, id="B1-T100-G2"),
    pytest.param(2, 77, 4, 1, 16, 8, 4, None, id="B2-T77-G4"),
    # Blocks that reach into the next sequence, and an empty one.
    pytest.param(1, 90, 2, 2, 16, 16, 3, (37, 0, 20, 33), id="varlen-G1"),
    pytest.param(1, 4097, 8, 2, 128, 64, 16, (1000, 3097), id="varlen-T4097-G4", marks=pytest.mark.gpu),
    pytest.param(2, 8192, 4, 4, 128, 64, 16, None, id="B2-T8192-G1", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("batch,num_tokens,hq,hkv,d,block_size,topk,lengths", DETERMINISTIC_CASES)
def test_deterministic_algorithms_give_a_run_to_run_identical_backward(
    batch, num_tokens, hq, hkv, d, block_size, topk, lengths, impl, monkeypatch
):
    """torch.use_deterministic_algorithms(True): the FSA backward runs in its deterministic mode for every impl (no
    atomics: dk/dv partials summed in a fixed order), gradients are bitwise identical on repeated runs and equal
    the reference."""
    launched = []

    def recording_launcher(kernel, grid):
        launch = launcher(kernel, grid)

        def record(*args, **kwargs):
            launched.append((kernel.__name__, kwargs.get("DETERMINISTIC")))
            return launch(*args, **kwargs)

        return record

    launcher = _selected_launchers.launcher
    monkeypatch.setattr(_selected_launchers, "launcher", recording_launcher)
    cu = None if lengths is None else make_cu_seqlens(lengths)
    dtype = torch.bfloat16 if num_tokens > 1000 else torch.float32  # GPU sizes in the training dtype
    q, k, v = make_qkv(batch, num_tokens, num_tokens, hq, hkv, d, dtype=dtype)
    indices = make_indices(batch, num_tokens, num_tokens, hkv, block_size, topk, cu)
    with deterministic_algorithms():
        runs = []
        for _ in range(2):
            o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, block_size, None, cu, impl)
            runs.append(torch.autograd.grad((o * o).sum() + lse.sum(), (q, k, v)))
        for first, second in zip(*runs):
            assert torch.equal(first, second)
        if impl != "auto":  # the Triton paths; "auto" on CPU is the PyTorch kernel
            backward = [mode for name, mode in launched if name.endswith("bwd_kernel")]
            assert backward and all(mode is True for mode in backward), launched
            assert not any(name == "_selected_attention_nsa_bwd_kernel" for name, _ in launched)
        out = torch.ops.fsa.selected_attention(q, k, v, indices, block_size, None, cu, impl)
        if num_tokens <= 1000:
            check_attention(
                out, lambda q, k, v: reference.selected_attention(q, k, v, indices, block_size, None, cu), (q, k, v),
                torch.float32,
            )
    if num_tokens > 1000:  # GPU sizes: the same gradients as the default (atomics) backward
        o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, block_size, None, cu, impl)
        default = torch.autograd.grad((o * o).sum() + lse.sum(), (q, k, v))
        for name, want, got in zip(("dq", "dk", "dv"), default, runs[0]):
            assert_close(name, want, got, RATIO[dtype])
