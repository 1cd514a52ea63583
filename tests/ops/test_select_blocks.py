import pytest
import torch

import fsa_compile
from fsa_compile import reference
from fsa_compile.ops.select_blocks import select_blocks
from tests._testing import ATTENTION_PATHS, DEVICE, SMALL_CASES, attention_path, cpu_kernel_disabled, make_qkv


@pytest.fixture(params=(*ATTENTION_PATHS, "few-queries"))
def path(request):
    """select_blocks through the PyTorch CPU kernel, the fused Triton kernel (interpreter on CPU) or, on the device
    path, the PyTorch selection of batched calls with few queries (here: up to 64)."""
    from fsa_compile.ops import _settings

    few_queries = 64 if request.param == "few-queries" else 0
    with attention_path("triton" if few_queries else request.param, select_blocks), \
            _settings.override("select_blocks_few_queries", few_queries):
        yield request.param

# (kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks)
SELECTIONS = [
    (8, 4, 16, 3, 1, 1),
    (16, 8, 16, 4, 0, 2),
    (32, 16, 32, 2, 1, 1),
    (8, 4, 8, 24, 2, 2),  # topk larger than the number of causal blocks
]


def selection_inputs(case, dtype, kernel_size, kernel_stride):
    q, _, _, cu = case.inputs(dtype)
    q = q.detach()
    num_cmp = max(0, (case.num_keys - kernel_size) // kernel_stride + 1)
    k_cmp = torch.randn(case.batch, num_cmp, case.hkv, case.d, dtype=dtype, device=DEVICE)
    seqlen_k = None if case.num_keys == case.num_queries else case.num_keys
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, kernel_size, kernel_stride, None, cu, seqlen_k)
    return q, k_cmp, lse, cu, seqlen_k


def check_format(indices, topk, block_size, num_keys_last_position):
    """Ascending, unique, -1 last, causal."""
    valid = indices >= 0
    assert torch.all(valid[..., 1:] <= valid[..., :-1]), "-1 slots must come last"
    ascending = indices[..., 1:] > indices[..., :-1]
    assert torch.all(torch.where(valid[..., 1:], ascending, True)), "indices must be strictly ascending"
    assert torch.all(torch.where(valid, indices <= num_keys_last_position // block_size, True)), "non-causal block"


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: "ks{}-st{}-bs{}-topk{}-init{}-local{}".format(*s))
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_matches_reference_exactly_in_float64(case, selection):
    ks, stride, bs, topk, init, local = selection
    q, k_cmp, lse, cu, seqlen_k = selection_inputs(case, torch.float64, ks, stride)
    got = fsa_compile.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local, None, cu, seqlen_k)
    want = reference.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local, None, cu, seqlen_k)
    assert got.dtype == torch.int32 and got.shape == (case.batch, case.num_queries, case.hkv, topk)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_selected_score_matches_reference(case, dtype, path):
    """Low precision may swap near-tied blocks: compare the total reference score of the chosen blocks."""
    ks, stride, bs, topk, init, local = 8, 4, 16, 3, 1, 1
    q, k_cmp, lse, cu, seqlen_k = selection_inputs(case, dtype, ks, stride)
    got = fsa_compile.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local, None, cu, seqlen_k)
    want = reference.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local, None, cu, seqlen_k)
    scores = reference.block_scores(q, k_cmp, lse, ks, stride, bs, None, cu, seqlen_k)
    scores = torch.nn.functional.pad(scores, (0, 1))  # the -1 slots read this zero column

    def total(indices):
        return scores.gather(-1, indices.long().cpu().masked_fill(indices.cpu() < 0, scores.shape[-1] - 1)).sum(-1)

    assert torch.equal(got.cpu() >= 0, want.cpu() >= 0), "number of selected blocks differs"
    torch.testing.assert_close(total(got), total(want), rtol=1e-2 if dtype == torch.float16 else 1e-4, atol=1e-4)
    check_format(got, topk, bs, case.num_keys - 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ties_go_to_the_lower_block(dtype, path):
    # q = 0: every visible compressed key is equally likely, so many blocks tie (exactly, in any precision).
    q = torch.zeros(1, 90, 2, 8, dtype=dtype, device=DEVICE)
    k_cmp = torch.randn(1, (90 - 8) // 8 + 1, 1, 8, dtype=dtype, device=DEVICE)
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, 8, 8)
    got = fsa_compile.select_blocks(q, k_cmp, lse, 8, 8, 8, 3, 0, 1)
    want = reference.select_blocks(q, k_cmp, lse, 8, 8, 8, 3, 0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Query at t=89 (block 11): local block 11 is forced; blocks 0..10 tie, so 0 and 1 win.
    assert got[0, 89, 0].tolist() == [0, 1, 11]


def test_nothing_visible_gives_forced_blocks_then_the_lowest(path):
    q = torch.randn(1, 20, 2, 8, device=DEVICE)
    k_cmp = torch.randn(1, 0, 1, 8, device=DEVICE)
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, 32, 16)
    got = fsa_compile.select_blocks(q, k_cmp, lse, 32, 16, 4, 4, 1, 2)
    last = torch.arange(20, device=DEVICE) // 4
    expected = torch.full((20, 4), -1, dtype=torch.int32)
    for t in range(20):
        # Forced: init block 0 and the two blocks ending at t // 4; every other candidate scores 0 (a tie),
        # so the remaining slots go to the lowest candidate blocks.
        forced = {0, *range(max(0, int(last[t]) - 1), int(last[t]) + 1)}
        rest = [j for j in range(int(last[t]) + 1) if j not in forced][: 4 - len(forced)]
        blocks = sorted(forced | set(rest))
        expected[t, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    assert torch.equal(got[0, :, 0].cpu(), expected)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(varlen, path):
    q, k_cmp, _ = make_qkv(1, 37, 8, 4, 2, 16)
    q, k_cmp = q.detach(), k_cmp.detach()
    cu = torch.tensor([0, 20, 37], dtype=torch.int32, device=DEVICE) if varlen else None
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, 8, 4, None, cu)
    torch.library.opcheck(torch.ops.fsa.select_blocks, (q, k_cmp, lse, 8, 4, 8, 3, 1, 1, None, cu))


def assert_same_blocks_where_clear(got, q, k_cmp, lse, selection, cu=None, seqlen_k=None):
    """got equals the reference selection wherever the last chosen and the first rejected non-forced candidate
    differ in score by more than 1e-4 (relative); elsewhere a swap is a rounding tie."""
    ks, stride, bs, topk, init, local = selection
    want = reference.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local, None, cu, seqlen_k).cpu()
    scores = reference.block_scores(q, k_cmp, lse, ks, stride, bs, None, cu, seqlen_k)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, want.long().clamp(min=0), want >= 0)
    candidate = scores > float("-inf")  # the blocks 0 .. t // block_size
    block = torch.arange(scores.shape[-1])
    last = candidate.sum(-1, keepdim=True) - 1
    forced = candidate & ((block < init) | (block > last - local))
    lowest_chosen = scores.masked_fill(~chosen | forced, float("inf")).amin(-1)
    best_rejected = scores.masked_fill(chosen | ~candidate, float("-inf")).amax(-1)
    clear = (lowest_chosen - best_rejected) > 1e-4 * scores.masked_fill(~candidate, 0).amax(-1).clamp(min=1e-30)
    assert clear.float().mean() > 0.5, "the inputs should mostly be free of near-ties"
    assert torch.equal(got.cpu()[clear], want[clear])


@pytest.mark.parametrize("selection", [SELECTIONS[1], SELECTIONS[3], (32, 16, 64, 16, 1, 2)],
                         ids=lambda s: "ks{}-st{}-bs{}-topk{}-init{}-local{}".format(*s))
@pytest.mark.parametrize("case", SMALL_CASES[::2], ids=lambda c: c.id)
def test_matches_reference_index_for_index_where_there_is_no_near_tie(case, selection, path):
    """float32: the chosen blocks equal the reference's wherever there is no rounding tie."""
    ks, stride, bs, topk, init, local = selection
    q, k_cmp, lse, cu, seqlen_k = selection_inputs(case, torch.float32, ks, stride)
    got = fsa_compile.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local, None, cu, seqlen_k)
    assert_same_blocks_where_clear(got, q, k_cmp, lse, selection, cu, seqlen_k)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4])
def test_realistic_sizes_bf16(group):
    """T = 8K, the layer's defaults, bf16 Triton kernel vs the PyTorch kernel on the same values in float32:
    the same number of blocks everywhere and (rounding ties apart) the same blocks."""
    from fsa_compile.ops.select_blocks import _select_blocks_torch

    T, hkv, d = 8192, 2, 128
    q = torch.randn(1, T, hkv * group, d, dtype=torch.bfloat16, device=DEVICE)
    k_cmp = torch.randn(1, (T - 32) // 16 + 1, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, 32, 16)
    got = fsa_compile.select_blocks(q, k_cmp, lse, 32, 16, 64, 16, 1, 2)
    want = _select_blocks_torch(q.float(), k_cmp.float(), lse, 32, 16, 64, 16, 1, 2, None, None, None, None, None)
    assert torch.equal(got >= 0, want >= 0)
    check_format(got, 16, 64, T - 1)
    same = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1) | (got < 0)
    assert same.float().mean() > 0.99, f"only {same.float().mean():.4f} of the chosen blocks agree"


@pytest.mark.parametrize("selection,num_tokens", [((8, 8, 8, 64, 1, 2), 600), ((64, 32, 128, 4, 1, 1), 700)],
                         ids=["topk64-bs8", "topk4-bs128"])
def test_triton_kernel_at_the_limits_of_topk_and_block_size(selection, num_tokens):
    """topk = 64 over up to 75 candidate blocks (64-key sorts and bitonic merges per step) and block_size = 128:
    the fused Triton kernel picks the same blocks as the PyTorch kernel (float32, fixed inputs without near-ties)."""
    if DEVICE != "cpu":
        pytest.skip("compares against the PyTorch CPU kernel")
    ks, stride, bs, topk, init, local = selection
    q = torch.randn(1, num_tokens, 1, 16)
    k_cmp = torch.randn(1, (num_tokens - ks) // stride + 1, 1, 16)
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, ks, stride)
    want = fsa_compile.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local)
    with cpu_kernel_disabled(select_blocks):
        got = fsa_compile.select_blocks(q, k_cmp, lse, ks, stride, bs, topk, init, local)
    check_format(got, topk, bs, num_tokens - 1)
    assert torch.all(want[0, -1] >= 0), "the last token should fill every slot"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("group,d", [(16, 32), (3, 20), (5, 8)], ids=["G16-D32", "G3-D20", "G5-D8"])
def test_odd_groups_and_head_dims(group, d, path):
    """G = 16 and groups / head dims that are not powers of two: the float32 selection matches the reference."""
    q = torch.randn(1, 90, 2 * group, d, device=DEVICE)
    k_cmp = torch.randn(1, (90 - 8) // 4 + 1, 2, d, device=DEVICE)
    _, lse = fsa_compile.compressed_attention(q, k_cmp, k_cmp, 8, 4)
    got = fsa_compile.select_blocks(q, k_cmp, lse, 8, 4, 16, 3, 1, 1)
    assert_same_blocks_where_clear(got, q, k_cmp, lse, (8, 4, 16, 3, 1, 1))
