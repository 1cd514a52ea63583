"""torch.compile through the ops: no graph breaks, eager numerics, no recompiles when T changes."""

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import fsa_compile
from fsa_compile import _compiled_glue, compression, modules
from fsa_compile.lowerings import compression_windows as windows_workaround
from fsa_compile.ops import SequenceLayout, _settings
from tests._testing import (
    DEVICE, RATIO, assert_close, fresh_compiled_glue, make_cu_seqlens, make_layer, make_small_layer,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_no_graph_breaks():
    layer = make_small_layer()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 45, 64, device=DEVICE))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_fullgraph_matches_eager_forward_and_backward(varlen):
    layer = make_small_layer()
    compiled = torch.compile(layer, fullgraph=True)
    cu = make_cu_seqlens((20, 37)) if varlen else None
    x = torch.randn(1 if varlen else 2, 57, 64, device=DEVICE, requires_grad=True)
    out, want = compiled(x, cu), layer(x, cu)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    cot = torch.randn_like(out)
    got = torch.autograd.grad((out * cot).sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad((want * cot).sum(), [x, *layer.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_compiled_glue_matches_eager(varlen, monkeypatch):
    """The setting ``compiled_glue``: an eager layer runs its projection side and gated combination through
    torch.compile. The device rule is widened to CPU so that CI compares the compiled functions themselves."""
    fresh_compiled_glue(monkeypatch)
    layer = make_small_layer()
    cu = make_cu_seqlens((20, 37)) if varlen else None
    x = torch.randn(1 if varlen else 2, 57, 64, device=DEVICE, requires_grad=True)
    cot = torch.randn(x.shape, device=DEVICE)
    results, graphs = [], []
    for on in (False, True, True):  # the second compiled step reuses the graphs
        with _settings.override("compiled_glue", on):
            out = layer(x, cu)
            results.append((out, *torch.autograd.grad((out * cot).sum(), [x, *layer.parameters()])))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] - graphs[0] == 2 and graphs[2] == graphs[1]  # _project and _combine, each compiled once
    for got in results[1:]:
        for name, g, e in zip(["out", "dx", *(n for n, _ in layer.named_parameters())], got, results[0]):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_set_compiled_glue(monkeypatch):
    monkeypatch.setattr(_compiled_glue, "DEVICES", ("cpu", "cuda"))
    x = torch.zeros(1, device=DEVICE)
    assert _compiled_glue.applies(x)  # the default
    try:
        fsa_compile.set_compiled_glue(False)
        assert not _compiled_glue.applies(x)
        with pytest.raises(TypeError, match="enabled must be a bool, got int 1"):
            fsa_compile.set_compiled_glue(1)
    finally:
        fsa_compile.set_compiled_glue(True)
    assert _compiled_glue.applies(x)


def test_compiled_glue_runs_eagerly_past_its_signature_budget():
    """A compiled glue function compiles its first signatures only: Dynamo would fail a fullgraph function called
    with more shapes than its recompile limit (an eager user with varying T)."""
    def glue(x, scale):
        return torch.sin(x) * scale

    run = _compiled_glue.compiled(glue)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=2):
        for length in (3, 4, 5, 6, 3):
            x = torch.randn(length, device=DEVICE)
            torch.testing.assert_close(run(x, 2.0), glue(x, 2.0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the setting applies on CUDA")
@pytest.mark.parametrize("group", [1, 4])
def test_compiled_glue_matches_eager_bf16(group):
    """compiled_glue at a realistic size: bf16, D = 128, the layer's defaults, T = 4096 (to bf16 rounding; a top-k
    near-tie may pick another block for a few queries)."""
    layer = make_layer(512, 4 * group, 4, 128, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, 512, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    cot = torch.randn_like(x)
    results = []
    for on in (False, True):
        with _settings.override("compiled_glue", on):
            out = layer(x)
            results.append((out, *torch.autograd.grad(out, [x, *layer.parameters()], cot)))
    for name, want, got in zip(["out", "dx", *(n for n, _ in layer.named_parameters())], *results):
        assert_close(name, want, got, RATIO[torch.bfloat16])


# (hidden, Hq, Hkv, D, layer config): overlapping and disjoint windows, blocks that are and are not multiples of
# the stride, init/local blocks from none to most of topk, windows of 1 token to more than T, G in {1, 2, 4, 8}.
GRID = [
    (64, 4, 2, 16, dict(kernel_size=16, kernel_stride=8, block_size=16, topk=3, init_blocks=1, local_blocks=1,
                        window_size=32)),  # the reproducer
    (32, 2, 2, 16, dict(kernel_size=8, kernel_stride=4, block_size=8, topk=3, init_blocks=1, local_blocks=1,
                        window_size=16)),
    (64, 4, 1, 16, dict(kernel_size=32, kernel_stride=16, block_size=64, topk=2, init_blocks=0, local_blocks=2,
                        window_size=512)),
    (64, 8, 1, 8, dict(kernel_size=16, kernel_stride=16, block_size=16, topk=4, init_blocks=2, local_blocks=1,
                       window_size=8)),
    (48, 4, 2, 12, dict(kernel_size=12, kernel_stride=4, block_size=20, topk=5, init_blocks=1, local_blocks=2,
                        window_size=1)),
    (32, 2, 1, 16, dict(kernel_size=4, kernel_stride=2, block_size=4, topk=6, init_blocks=0, local_blocks=0,
                        window_size=64)),
]
GRID_IDS = ["ks{kernel_size}-st{kernel_stride}-bs{block_size}-top{topk}-init{init_blocks}-local{local_blocks}-"
            "win{window_size}".format(**c) + f"-G{hq // hkv}" for _, hq, hkv, _, c in GRID]
# float64 on CPU, so that any difference is a miscompile, not rounding; on CUDA float32 (the Triton kernels).
GRID_DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
GRID_RATIO = 1e-10 if DEVICE == "cpu" else RATIO[torch.float32]


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
@pytest.mark.parametrize("hidden,hq,hkv,d,config", GRID, ids=GRID_IDS)
def test_compiled_gradients_match_eager_over_layer_configs(hidden, hq, hkv, d, config, varlen):
    """Every parameter gradient and dx of a compiled layer equal eager's (issue: a CPU Inductor miscompile lost
    the compression path's share of dk in some configurations)."""
    layer = make_layer(hidden, hq, hkv, d, dtype=GRID_DTYPE, **config)
    # Sequences long enough to see several compressed keys: a query that sees exactly one has ds = 0, so the
    # compress parameters' gradient would be rounding noise alone (relative error meaningless in float32).
    cu = make_cu_seqlens((5, 0, 75)) if varlen else None
    x = torch.randn(1 if varlen else 2, 80, hidden, device=DEVICE, dtype=GRID_DTYPE)
    cot = torch.randn(x.shape, device=DEVICE, dtype=GRID_DTYPE)
    results = []
    for model in (layer, torch.compile(layer, fullgraph=True)):
        x_run = x.clone().requires_grad_()
        out = model(x_run, cu)
        results.append((out, torch.autograd.grad((out * cot).sum(), [x_run, *layer.parameters()])))
    (want, want_grads), (got, got_grads) = results
    assert_close("out", want, got, GRID_RATIO)
    names = ["dx", *(f"d{name}" for name, _ in layer.named_parameters())]
    for name, expected, grad in zip(names, want_grads, got_grads):
        assert_close(name, expected, grad, GRID_RATIO)


def _slice_rotary_embedding(x, positions, theta):
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=x.dtype) / half)
    angles = positions.to(x.dtype).unsqueeze(-1) * inv_freq
    cos, sin = torch.cos(angles).unsqueeze(-2), torch.sin(angles).unsqueeze(-2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _project_as_it_was(layer, x, cu_seqlens=None):
    """The layer's ``project`` as it was when the bug below was pinned: separate q/k/v projections, k and v
    compressed one after the other, RoPE written with slices."""
    batch, num_tokens, _ = x.shape
    q = layer.q_proj(x).view(batch, num_tokens, layer.num_heads, layer.head_dim)
    k = layer.k_proj(x).view(batch, num_tokens, layer.num_kv_heads, layer.head_dim)
    v = layer.v_proj(x).view(batch, num_tokens, layer.num_kv_heads, layer.head_dim)
    gates = torch.sigmoid(layer.gate_proj(x)).view(batch, num_tokens, layer.num_heads, 3)
    ks, stride = layer.kernel_size, layer.kernel_stride
    k_cmp = compression.compress(k, layer.compress_key, layer.compress_key_pos, ks, stride, cu_seqlens)
    v_cmp = compression.compress(v, layer.compress_value, layer.compress_value_pos, ks, stride, cu_seqlens)
    layout = SequenceLayout(batch, num_tokens, num_tokens, x.device, cu_seqlens)
    _, cmp_positions, _ = layout.compressed_rows(ks, stride)
    q = _slice_rotary_embedding(q, layout.query_positions, layer.rope_theta)
    k = _slice_rotary_embedding(k, layout.query_positions, layer.rope_theta)
    k_cmp = _slice_rotary_embedding(k_cmp, cmp_positions, layer.rope_theta)
    return dict(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gates=gates)


@pytest.mark.skipif(DEVICE != "cpu", reason="a bug of Inductor's C++ (CPU) backend")
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="Inductor CPU miscompile, torch 2.13 (see below)")
def test_inductor_bug_shared_zeros_index_put(monkeypatch):
    """Pins the Inductor bug that ops/compression_windows.py works around; when this starts to pass (strict
    xfail fails), compress can go back to the plain gather.

    With the windows gathered in plain PyTorch, the layer's compiled backward has one zeros buffer shared by RoPE's
    slice backward of k and the accumulating index_puts of the k and v window gathers. Inductor turns the last
    index_put into an in-place one on that buffer and fuses the add of its result (dk = RoPE part + compress part)
    into the kernel that zero-fills the buffer, which runs before the index_put: dk loses its compress part.
    Attempts to reduce it to a graph without the fsa ops (the same projections, gathers and RoPE around einsum
    attention, opaque or not) compiled correctly, so the pin is the layer itself."""
    monkeypatch.setattr(windows_workaround, "OPAQUE_WINDOW_DEVICES", ())
    # The graph that shows it (the layer as it was): the gather (not the chunked matmul), _project_as_it_was.
    monkeypatch.setattr(compression, "_chunks_apply", lambda *_: False)
    monkeypatch.setattr(modules.FlashSparseAttention, "project", _project_as_it_was)
    hidden, hq, hkv, d, config = GRID[0]
    layer = make_layer(hidden, hq, hkv, d, dtype=torch.float64, **config)
    x = torch.randn(2, 80, hidden, dtype=torch.float64)
    grads = []
    for model in (layer, torch.compile(layer, fullgraph=True)):
        model(x).sum().backward()
        grads.append(layer.k_proj.weight.grad)
        layer.zero_grad(set_to_none=True)
    assert_close("dk_proj", grads[0], grads[1], 1e-10)


def test_dynamic_shapes_do_not_recompile():
    layer = make_small_layer()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for num_tokens in (45, 50, 77):
        x = torch.randn(2, num_tokens, 64, device=DEVICE, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        torch.testing.assert_close(out, layer(x), rtol=1e-4, atol=1e-5)
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for T={num_tokens}"


class _Decoder(torch.nn.Module):
    """Two pre-norm blocks of FlashSparseAttention + MLP, as a model would use the layer."""

    def __init__(self):
        super().__init__()
        self.attention = torch.nn.ModuleList([make_small_layer(), make_small_layer()])
        self.mlp = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                                            torch.nn.Linear(128, 64)) for _ in range(2)])
        self.norm = torch.nn.ModuleList([torch.nn.RMSNorm(64) for _ in range(4)])

    def forward(self, x, cu_seqlens=None):
        for i, (attention, mlp) in enumerate(zip(self.attention, self.mlp)):
            x = x + attention(self.norm[2 * i](x), cu_seqlens)
            x = x + mlp(self.norm[2 * i + 1](x))
        return x


def test_decoder_compiles_without_breaks_or_recompiles():
    decoder = _Decoder().to(DEVICE)
    assert torch._dynamo.explain(decoder)(torch.randn(1, 40, 64, device=DEVICE)).graph_break_count == 0
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(decoder, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for lengths in ((40,), (13, 50), (70,)):
        cu = make_cu_seqlens(lengths) if len(lengths) > 1 else None
        x = torch.randn(1, sum(lengths), 64, device=DEVICE, requires_grad=True)
        out = compiled(x, cu)
        torch.testing.assert_close(out, decoder(x, cu), rtol=1e-4, atol=1e-4)
        out.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in decoder.parameters())
        frames = counter.frame_count if frames is None else frames
    # One recompile is allowed for the switch between batched (cu_seqlens=None) and packed inputs.
    assert counter.frame_count <= frames + 1


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_cuda_graphs_match_eager():
    """mode="reduce-overhead" captures the layer in CUDA graphs: no host sync or capture-breaking allocation."""
    layer = make_small_layer()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for step in range(3):  # warm-up, record, replay
        x = torch.randn(2, 64, 64, device=DEVICE, requires_grad=True)
        out = compiled(x)
        want = layer(x)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        (got,) = torch.autograd.grad(out.square().sum(), x)
        (expected,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# The Triton kernels of each fsa op, forward and backward (ops/_kernels/).
FSA_TRITON_KERNELS = {
    "_masked_attention_fwd_kernel", "_masked_attention_bwd_dq_kernel", "_masked_attention_bwd_dkdv_kernel",
    "_select_blocks_kernel",
}


def _training_step(model):
    """x -> model(x), after the backward of a sum-of-squares loss (x.grad and the parameter grads are set)."""
    def step(x):
        out = model(x)
        out.float().square().sum().backward()
        return out
    return step


def _assert_step_matches_eager(layer, x, out, ratio):
    """out and the grads a compiled ``_training_step`` left on x and the layer match one eager step."""
    got = [x.grad, *(p.grad for p in layer.parameters())]
    layer.zero_grad()
    x_eager = x.detach().requires_grad_()
    want = _training_step(layer)(x_eager)
    assert_close("out", want, out, ratio)
    for i, (g, e) in enumerate(zip(got, [x_eager.grad, *(p.grad for p in layer.parameters())])):
        assert_close(f"grad {i}", e, g, ratio)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the ops are traced into Triton kernels on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_cuda_compile_launches_the_triton_kernels_from_generated_code(dtype, dynamic):
    """On CUDA with static shapes, Inductor traces the ops through their launchers
    (lowerings/triton_launches.py): the generated code launches our Triton kernels itself, forward and
    backward, with no torch.ops.fsa call left but the cuDNN path of compressed attention. With dynamic=True the
    ops stay opaque calls (a torch bug, see triton_launches.traces_triton). Both match eager. Small dk/dv chunks
    put the chunked masked backward (float32 partials and their sum) in the traced graph too."""
    layer = make_small_layer().to(dtype)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    x = torch.randn(2, 77, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    with torch._inductor.config.patch(force_disable_caches=True), _settings.override("masked_dkdv_chunk_tokens", 16):
        out, codes = run_and_get_code(_training_step(compiled), x)
    code = "\n".join(codes)
    fsa_calls = set(re.findall(r"torch\.ops\.fsa\.(\w+)", code))
    launched = set(re.findall(r"(_\w+_kernel)", code))
    if dynamic:
        assert {"compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention"} <= fsa_calls
    else:
        # The cuDNN path of compressed attention (16-bit) is an opaque op on purpose (ops/_compressed_dense.py).
        assert fsa_calls <= {"_compressed_dense_forward", "_compressed_dense_backward"}, fsa_calls
        assert FSA_TRITON_KERNELS <= launched, FSA_TRITON_KERNELS - launched
        assert any(name.startswith("_selected_attention_") for name in launched), sorted(launched)
    # Relative RMS: in bf16 the compiled projections round differently, which may flip a near-tied selection.
    _assert_step_matches_eager(layer, x, out, RATIO[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the ops are traced into Triton kernels on CUDA only")
def test_cuda_static_compile_picks_launch_settings_that_fit(monkeypatch):
    """fp32 with D=256 does not fit the tuned tile settings in shared memory. A static-shape compile with no eager
    call before it must still pick settings that fit while it traces the launchers (triton_launches.check_kernel_fits),
    not fail when the compiled code runs."""
    import fsa_compile
    from fsa_compile.ops import _launch

    monkeypatch.setattr(_launch, "_FITTING_SETTINGS", {})
    config = dict(kernel_size=16, kernel_stride=8, block_size=16, topk=4, init_blocks=1, local_blocks=1, window_size=64)
    layer = fsa_compile.FlashSparseAttention(128, 2, 1, 256, **config).to(DEVICE)
    x = torch.randn(1, 301, 128, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    out, codes = run_and_get_code(_training_step(compiled), x)
    assert "torch.ops.fsa" not in "\n".join(codes)
    assert any(index > 0 for _, index in _launch._FITTING_SETTINGS.values()), _launch._FITTING_SETTINGS
    _assert_step_matches_eager(layer, x, out, RATIO[torch.float32])
