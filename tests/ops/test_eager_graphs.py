"""Eager calls on CUDA replay CUDA graphs of themselves (ops/_eager_graphs.py): the same results as direct calls."""

import pytest
import torch

import fsa_compile
from fsa_compile.ops import _eager_graphs, _settings

from tests._testing import DEVICE, assert_close, deterministic_algorithms, make_cu_seqlens, make_layer, make_qkv
from tests.ops.test_selected_attention import realistic_indices

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")


@pytest.fixture(autouse=True)
def _restore_budget():
    default = _settings.get("eager_cuda_graphs")
    yield
    _settings.replace("eager_cuda_graphs", default)
    _eager_graphs.clear()


def _three_runs(step, inputs, max_bytes):
    """``step(*inputs[i])`` for each i with the given graph budget (None: direct calls), from an empty cache."""
    fsa_compile.set_eager_cuda_graphs(max_bytes)
    return [step(*x) for x in inputs]


def _assert_runs_equal(want, got, exact: bool, ratio: float = 0.0):
    for run_want, run_got in zip(want, got, strict=True):
        for index, (a, b) in enumerate(zip(run_want, run_got, strict=True)):
            if exact:
                assert torch.equal(a, b), f"output {index} differs"
            else:
                assert_close(f"output {index}", a, b, ratio)


def _selected_forward(num_tokens):
    """-> (q, forward): bf16 q [1, T, 4, 128] and ``forward(q)``, selected attention over fixed k, v and realistic
    indices (G = 1, block 64, top-16)."""
    q, k, v = make_qkv(1, num_tokens, num_tokens, 4, 4, 128, dtype=torch.bfloat16)
    indices = realistic_indices(1, num_tokens, 4, 64, 16)
    return q, lambda q: torch.ops.fsa.selected_attention(q, k, v, indices, 64)


@pytest.mark.parametrize("max_bytes,error,message", [
    ("1GB", TypeError, "max_bytes must be an int or None, got str '1GB'"),
    (1.5, TypeError, "max_bytes must be an int or None, got float 1.5"),
    (True, TypeError, "max_bytes must be an int or None, got bool True"),
    (-1, ValueError, "max_bytes must be >= 0, got -1"),
])
def test_budget_is_checked(max_bytes, error, message):
    with pytest.raises(error, match=message):
        fsa_compile.set_eager_cuda_graphs(max_bytes)


def test_cpu_calls_run_directly():
    calls = []

    def implementation(x, n):
        calls.append(n)
        return x + n

    x = torch.zeros(3)
    for _ in range(3):
        assert torch.equal(_eager_graphs.run("test", implementation, (x, 1)), x + 1)
    assert calls == [1, 1, 1] and _eager_graphs.cached_bytes() == 0


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4])
def test_selected_attention_replays_equal_direct_calls_bitwise(group):
    """Forward and deterministic backward: call 1 runs directly, call 2 captures, call 3 replays; each on new
    values, each bitwise equal to a direct call."""
    num_tokens, hkv = 4096, 2
    lengths = (1000, 3096)
    cu = make_cu_seqlens(lengths)
    inputs = []
    for _ in range(3):
        q, k, v = make_qkv(1, num_tokens, num_tokens, hkv * group, hkv, 128, dtype=torch.bfloat16)
        inputs.append((q, k, v, realistic_indices(1, num_tokens, hkv, 64, 16), torch.randn_like(q)))

    def step(q, k, v, indices, do):
        o, lse = torch.ops.fsa.selected_attention(q, k, v, indices, 64, None, cu, "fsa")
        return (o, lse, *torch.autograd.grad((o, lse), (q, k, v), (do, torch.ones_like(lse))))

    with deterministic_algorithms():
        want = _three_runs(step, inputs, None)
        got = _three_runs(step, inputs, 1 << 30)
    assert _eager_graphs.cached_bytes() > 0
    _assert_runs_equal(want, got, exact=True)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_layer_replays_equal_direct_calls(packed):
    """The layer's ops (compressed on cuDNN or Triton, select_blocks, selected, window): forward bitwise, gradients
    (atomics, cuDNN's dq order) to rounding."""
    layer = make_layer(512, 4, 2, 128, dtype=torch.bfloat16)
    cu = make_cu_seqlens((700, 1348)) if packed else None
    inputs = [(torch.randn(1, 2048, 512, device=DEVICE, dtype=torch.bfloat16, requires_grad=True),)
              for _ in range(3)]

    def step(x):
        out = layer(x, cu_seqlens=cu)
        return (out, *torch.autograd.grad(out, (x, *layer.parameters()), torch.ones_like(out)))

    want = _three_runs(step, inputs, None)
    got = _three_runs(step, inputs, 1 << 30)
    assert _eager_graphs.cached_bytes() > 0
    _assert_runs_equal([run[:1] for run in want], [run[:1] for run in got], exact=True)
    _assert_runs_equal([run[1:] for run in want], [run[1:] for run in got], exact=False, ratio=1e-2)


@cuda_only
@pytest.mark.gpu
def test_side_streams_run_directly_and_budgets(monkeypatch):
    """Calls on a side stream run directly, also when the default stream has a graph of them (torch.compile's
    cudagraph trees warm up on a side stream with the thread's allocations routed to their pool); a zero budget
    caches nothing."""
    q, forward = _selected_forward(2048)
    queries = [torch.randn_like(q) for _ in range(4)]
    want = _three_runs(forward, [(x,) for x in queries], None)
    fsa_compile.set_eager_cuda_graphs(1 << 30)
    got = [forward(queries[0]), forward(queries[1])]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    assert _eager_graphs.cached_bytes() > 0
    replays = []
    replay = _eager_graphs._Graph.replay
    monkeypatch.setattr(_eager_graphs._Graph, "replay", lambda self, args: replays.append(1) or replay(self, args))
    with torch.cuda.stream(side):
        got += [forward(queries[2]), forward(queries[3])]
    torch.cuda.current_stream().wait_stream(side)
    assert not replays  # the graph of the default stream is not used on the side stream
    forward(queries[0])
    assert replays == [1]
    _assert_runs_equal(want, got, exact=True)
    got = _three_runs(forward, [(x,) for x in queries], 0)
    assert _eager_graphs.cached_bytes() == 0
    _assert_runs_equal(want, got, exact=True)


@cuda_only
@pytest.mark.gpu
def test_calls_inside_a_capture_run_directly():
    """Inside the caller's own CUDA graph the op is recorded into that graph, not replayed from its own."""
    q, forward = _selected_forward(1024)
    fsa_compile.set_eager_cuda_graphs(1 << 30)
    want = [forward(q) for _ in range(2)][0]  # the second call cached a graph
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward(q)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = forward(q)
    graph.replay()
    assert torch.equal(o, want[0]) and torch.equal(lse, want[1])


@cuda_only
@pytest.mark.gpu
def test_a_change_of_settings_drops_the_graphs():
    """Graphs captured under other launch settings are dropped at the next call (they would never replay)."""
    q, forward = _selected_forward(2048)
    fsa_compile.set_eager_cuda_graphs(1 << 30)
    with _settings.override("fused_index_inversion", False):
        want = [forward(q) for _ in range(3)]
        assert _eager_graphs.cached_bytes() > 0
        assert all(torch.equal(a, b) for a, b in zip(want[0], want[2]))
    got = forward(q)
    assert _eager_graphs.cached_bytes() == 0
    assert all(torch.equal(a, b) for a, b in zip(want[0], got))


class _FakeGraph:
    """Stands in for a captured graph on CPU: the policy of ``run`` without a GPU."""

    host_seconds, gpu_seconds, num_bytes = 2e-3, 1e-3, 100
    captured: list = []

    def __init__(self, implementation, args, device):
        self.implementation = implementation
        _FakeGraph.captured.append(args)

    def replay(self, args):
        return ("replay", self.implementation(*args))


@pytest.fixture
def fake_graphs(monkeypatch):
    """``_eager_graphs.run`` on CPU tensors with captures faked; yields the list of captured calls."""
    monkeypatch.setattr(_eager_graphs, "_Graph", _FakeGraph)
    monkeypatch.setattr(_eager_graphs, "_key", lambda name, args: (name, tuple(args[0].shape), "device"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "default")
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: "default")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_FakeGraph, "captured", [])
    _eager_graphs.clear()
    fsa_compile.set_eager_cuda_graphs(1000)
    yield _FakeGraph.captured


def _double(x):
    return 2 * x


def test_second_call_captures_and_later_calls_replay(fake_graphs):
    x = torch.ones(3)
    results = [_eager_graphs.run("op", _double, (x,)) for _ in range(3)]
    assert torch.equal(results[0], 2 * x)  # the first call runs directly
    assert [r[0] for r in results[1:]] == ["replay", "replay"]
    assert len(fake_graphs) == 1 and _eager_graphs.cached_bytes() == 100


def test_gpu_bound_calls_and_calls_over_the_budget_run_directly(fake_graphs, monkeypatch):
    monkeypatch.setattr(_FakeGraph, "gpu_seconds", 1.0)  # kernels outlast the host work: not graphed
    calls = [_eager_graphs.run("op", _double, (torch.ones(3),)) for _ in range(4)]
    assert all(isinstance(c, torch.Tensor) for c in calls) and len(fake_graphs) == 1  # captured once, then never
    monkeypatch.setattr(_FakeGraph, "gpu_seconds", 1e-3)
    monkeypatch.setattr(_FakeGraph, "num_bytes", 1001)  # over the budget of 1000
    calls = [_eager_graphs.run("op", _double, (torch.ones(4),)) for _ in range(4)]
    assert all(isinstance(c, torch.Tensor) for c in calls) and len(fake_graphs) == 2
    assert _eager_graphs.cached_bytes() == 0


def test_side_streams_and_settings_changes(fake_graphs, monkeypatch):
    x = torch.ones(3)
    for _ in range(2):
        _eager_graphs.run("op", _double, (x,))
    assert _eager_graphs.cached_bytes() == 100
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "side")
    assert isinstance(_eager_graphs.run("op", _double, (x,)), torch.Tensor)  # a side stream runs directly
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "default")
    assert _eager_graphs.run("op", _double, (x,))[0] == "replay"
    with _settings.override("fused_index_inversion", False):
        assert isinstance(_eager_graphs.run("op", _double, (x,)), torch.Tensor)  # graphs of other settings dropped
    assert _eager_graphs.cached_bytes() == 0
