"""NSACache: feeding a sequence in any chunking (prefill chunks, single decode tokens) gives the outputs of one full
forward, for the layer and the decoder; the cache's compressed tokens are those of the full sequence."""

import contextlib

import pytest
import torch

import fsa_compile
from fsa_compile.models import ModelConfig, NSAConfig, Transformer
from fsa_compile.ops import _settings
from tests._testing import (
    DEVICE, RATIO, assert_close, cpu_kernel_disabled, fresh_compiled_glue, make_layer, make_small_layer,
)

CHUNKINGS = {
    "prefill-then-decode": (40, *([1] * 12), 18),
    "decode-from-empty": (1,) * 23 + (47,),
    "uneven-chunks": (7, 3, 1, 29, 1, 16, 13),
}
LAYERS = {
    "overlapping-windows": dict(),
    "stride-equals-kernel": dict(kernel_size=8, kernel_stride=8, window_size=5),
    "G4-wide-window": dict(num_heads=8, num_kv_heads=2, kernel_size=12, kernel_stride=4, block_size=16, topk=2,
                           window_size=100),
}


@contextlib.contextmanager
def kernel_path(path):
    """"torch": the CPU kernels; "triton": the Triton kernels (on CPU tensors under the interpreter)."""
    from fsa_compile.ops import compressed_attention, select_blocks, selected_attention, sliding_window_attention

    if path == "torch" or DEVICE != "cpu":
        yield
        return
    with cpu_kernel_disabled(compressed_attention.compressed_attention, select_blocks.select_blocks,
                             selected_attention.selected_attention, sliding_window_attention.sliding_window_attention):
        yield


def run_chunked(layer, x, chunks, cache):
    outputs, start = [], 0
    for n in chunks:
        outputs.append(layer(x[:, start : start + n], cache=cache))
        start += n
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("layer_config", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_chunked_layer_equals_full_forward_float64(chunks, layer_config):
    layer = make_small_layer(**layer_config, dtype=torch.float64)
    x = torch.randn(2, sum(chunks), layer.hidden_size, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = fsa_compile.NSACache(layer, batch_size=2, max_seqlen=sum(chunks) + 5)
        chunked = run_chunked(layer, x, chunks, cache)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    assert cache.seqlen == sum(chunks) and cache.seqlens.tolist() == [sum(chunks)] * 2


def test_chunked_layer_with_compiled_glue_equals_full_forward(monkeypatch):
    """The setting compiled_glue (the device rule widened to CPU): prefill, decode steps and a chunk through the cache
    with the gated combination compiled (one graph per signature) give the full forward, which runs its projection
    side compiled too."""
    fresh_compiled_glue(monkeypatch)
    layer = make_small_layer(dtype=torch.float64)
    chunks = (23, 1, 1, 1, 9)
    x = torch.randn(2, sum(chunks), layer.hidden_size, device=DEVICE, dtype=torch.float64)
    with torch.no_grad(), _settings.override("compiled_glue", False):
        want = layer(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad(), _settings.override("compiled_glue", True):
        full = layer(x)
        chunked = run_chunked(layer, x, chunks, fsa_compile.NSACache(layer, batch_size=2, max_seqlen=sum(chunks)))
    # project at T = 35; the combination at T = 35, 23, 1 and 9
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 5
    torch.testing.assert_close(full, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked, want, rtol=0, atol=1e-12)


def test_cache_holds_the_compressed_tokens_of_the_full_sequence():
    layer = make_small_layer(dtype=torch.float64)
    x = torch.randn(1, 61, layer.hidden_size, device=DEVICE, dtype=torch.float64)
    cache = fsa_compile.NSACache(layer, 1, 64)
    with torch.no_grad():
        run_chunked(layer, x, (5, 1, 1, 2, 30, 22), cache)
        full = layer.project(x)
    windows = full["k_cmp"].shape[1]
    assert windows == (61 - 8) // 4 + 1
    torch.testing.assert_close(cache.k_cmp[:, :windows], full["k_cmp"], rtol=0, atol=1e-13)
    torch.testing.assert_close(cache.v_cmp[:, :windows], full["v_cmp"], rtol=0, atol=1e-13)
    torch.testing.assert_close(cache.k[:, :61], full["k"], rtol=0, atol=1e-13)


@pytest.mark.parametrize("layer_config", LAYERS.values(), ids=LAYERS.keys())
def test_rows_of_different_lengths(layer_config):
    """Right-padded prompts of lengths (37, 9, 50, 1) with ``lengths``, then decode steps and a chunk: each row's
    outputs are those of its own sequence alone; the cache's compressed keys are those of each full sequence."""
    layer = make_small_layer(**layer_config, dtype=torch.float64)
    prompt_lengths, steps, tail = (37, 9, 50, 1), 6, 11
    longest = max(prompt_lengths) + steps + tail
    x = torch.randn(4, longest, layer.hidden_size, device=DEVICE, dtype=torch.float64)
    cache = fsa_compile.NSACache(layer, 4, longest)
    lengths = torch.tensor(prompt_lengths, device=DEVICE)
    with torch.no_grad():
        prompt = torch.stack([torch.cat([x[b, :n], torch.zeros_like(x[b, n:50])])
                              for b, n in enumerate(prompt_lengths)])
        outputs = [layer(prompt, cache=cache, lengths=lengths)]
        # Row b continues with its own tokens n, n+1, ...
        follow = torch.stack([x[b, n : n + steps + tail] for b, n in enumerate(prompt_lengths)])
        outputs += [layer(follow[:, i : i + 1], cache=cache) for i in range(steps)]
        outputs.append(layer(follow[:, steps:], cache=cache))
        assert cache.seqlens.tolist() == [n + steps + tail for n in prompt_lengths]
        for b, n in enumerate(prompt_lengths):
            sequence = torch.cat([x[b : b + 1, :n], follow[b : b + 1]], dim=1)
            alone = layer(sequence)
            torch.testing.assert_close(outputs[0][b, :n], alone[0, :n], rtol=0, atol=1e-12)
            torch.testing.assert_close(torch.cat([o[b] for o in outputs[1:]]), alone[0, n:], rtol=0, atol=1e-12)
            windows = layer.project(sequence)["k_cmp"]
            torch.testing.assert_close(cache.k_cmp[b, : windows.shape[1]], windows[0], rtol=0, atol=1e-13)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter path; the GPU runs the kernels in the bf16 test below")
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_chunked_layer_equals_full_forward_on_each_kernel_path(path):
    """float32, the same path for the full forward and the chunks: the Triton kernels (interpreter) with Tq < Tk,
    one query (decode, the NSA kernel) and a chunk (the FSA kernel)."""
    layer = make_small_layer()
    x = torch.randn(2, 90, layer.hidden_size, device=DEVICE)
    with torch.no_grad(), kernel_path(path):
        full = layer(x)
        chunked = run_chunked(layer, x, (70, 1, 1, 18), fsa_compile.NSACache(layer, 2, 90))
    assert_close("chunked", full, chunked, RATIO[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4])
def test_chunked_layer_equals_full_forward_bf16(group):
    """The layer's defaults at T = 4K in bf16: a 3000-token prefill, 16 decode steps, a last chunk."""
    layer = make_layer(hidden_size=512, num_heads=4 * group, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, 512, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
        chunked = run_chunked(layer, x, (3000, *([1] * 16), 1080), fsa_compile.NSACache(layer, 1, 4096))
    assert_close("chunked", full.float(), chunked.float(), RATIO[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4])
def test_decode_under_a_cuda_graph_equals_eager(group):
    """bf16, the layer's defaults: rows prefilled to 3000 and 2200 tokens (``lengths``), then 40 decode steps (two
    compressed windows complete in each row) replayed from one captured graph: close to the eager steps, and each
    row close to its own sequence's full forward."""
    layer = make_layer(hidden_size=512, num_heads=4 * group, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16)
    prompt_lengths, steps = (3000, 2200), 40
    x = torch.randn(2, 3000 + steps, 512, device=DEVICE, dtype=torch.bfloat16)
    follow = torch.stack([x[b, n : n + steps] for b, n in enumerate(prompt_lengths)])
    caches = [fsa_compile.NSACache(layer, 2, 3000 + steps) for _ in range(2)]
    lengths = torch.tensor(prompt_lengths, device=DEVICE)
    with torch.no_grad():
        for cache in caches:
            layer(x[:, :3000], cache=cache, lengths=lengths)
        graph = fsa_compile.CUDAGraphStep(lambda token: layer(token, cache=caches[1]), [caches[1]], follow[:, :1])
        eager = torch.cat([layer(follow[:, i : i + 1], cache=caches[0]) for i in range(steps)], dim=1)
        graphed = torch.cat([graph(follow[:, i : i + 1]).clone() for i in range(steps)], dim=1)
        # Not bitwise: cuBLAS may pick other kernels while a graph is captured (seen on an H100: 1-ulp differences).
        assert_close("graphed vs eager", eager.float(), graphed.float(), RATIO[torch.bfloat16])
        assert caches[1].seqlens.tolist() == [n + steps for n in prompt_lengths] and caches[1].seqlen == 3000 + steps
        for b, n in enumerate(prompt_lengths):
            alone = layer(torch.cat([x[b : b + 1, :n], follow[b : b + 1]], dim=1))
            assert_close(f"row {b}", alone[0, n:].float(), graphed[b].float(), RATIO[torch.bfloat16])
        with pytest.raises(ValueError, match="the captured shape"):
            graph(follow)


def test_reorder_follows_beams():
    """After reorder(rows), row i continues the sequence of row rows[i]."""
    layer = make_small_layer(dtype=torch.float64)
    x = torch.randn(3, 30, layer.hidden_size, device=DEVICE, dtype=torch.float64)
    rows = torch.tensor([2, 2, 0], device=DEVICE)
    cache = fsa_compile.NSACache(layer, 3, 40)
    with torch.no_grad():
        layer(x[:, :21], cache=cache)
        cache.reorder(rows)
        step = layer(x[rows, 21:], cache=cache)
        full = layer(x[rows])
    torch.testing.assert_close(step, full[:, 21:], rtol=0, atol=1e-12)


def test_decoder_prefill_and_decode_equal_one_forward():
    nsa = NSAConfig(kernel_size=8, kernel_stride=4, block_size=8, topk=3, init_blocks=1, local_blocks=1,
                    window_size=12)
    config = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, nsa=nsa)
    model = Transformer(config, device=DEVICE, dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 45), device=DEVICE)
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 50)
        steps = [model(tokens[:, :30], cache=cache)]
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(30, 45)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)


def test_cache_errors_and_reset():
    layer = make_small_layer()
    cache = fsa_compile.NSACache(layer, 2, 10)
    x = torch.randn(2, 8, layer.hidden_size, device=DEVICE)
    with torch.no_grad():
        layer(x, cache=cache)
        with pytest.raises(ValueError, match=r"max_seqlen=10 tokens: 8 \+ 3 do not fit"):
            layer(torch.randn(2, 3, layer.hidden_size, device=DEVICE), cache=cache)
        with pytest.raises(ValueError, match="batch_size=2 rows, got 1"):
            layer(x[:1], cache=cache)
        with pytest.raises(ValueError, match="not packed sequences"):
            layer(x[:1], torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), cache=cache)
        cache.reset()
        torch.testing.assert_close(layer(x, cache=cache), layer(x))
    full = Transformer(ModelConfig(vocab_size=10, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                   attention="full"))
    with pytest.raises(ValueError, match="a KV cache serves NSA attention"):
        full.make_cache(1, 8)
    with pytest.raises(TypeError, match="layer must be a FlashSparseAttention, got FullCausalAttention"):
        fsa_compile.NSACache(full.layers[0].attention, 1, 8)
