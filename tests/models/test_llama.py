"""The Llama-style decoder: both attentions, batched and packed inputs, compiled against eager, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from fsa_compile import FlashSparseAttention
from fsa_compile.models import FullCausalAttention, ModelConfig, NSAConfig, Transformer
from tests._testing import DEVICE, RATIO, assert_close

NSA = NSAConfig(kernel_size=8, kernel_stride=4, block_size=8, topk=3, init_blocks=1, local_blocks=1, window_size=12)


def make_model(attention="nsa", dtype=torch.float64, **overrides):
    config = ModelConfig(**(dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 attention=attention, nsa=NSA) | overrides))
    torch.manual_seed(0)
    return Transformer(config, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_packed_equals_batched(attention):
    """Sequences packed with cu_seqlens give the logits (and gradients) of the same sequences batched."""
    model = make_model(attention)
    tokens = torch.randint(0, 50, (3, 37), device=DEVICE)
    batched = model(tokens)
    cu_seqlens = torch.arange(0, 4 * 37, 37, dtype=torch.int32, device=DEVICE)
    packed = model(tokens.reshape(1, -1), cu_seqlens).view(3, 37, -1)
    assert_close("logits", batched, packed, RATIO[torch.float64])
    grads = [torch.autograd.grad(out.square().sum(), model.parameters()) for out in (batched, packed)]
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert_close(name, a, b, RATIO[torch.float64])


def test_packed_sequences_do_not_see_each_other():
    model = make_model("nsa")
    first, second = torch.randint(0, 50, (1, 29), device=DEVICE), torch.randint(0, 50, (1, 40), device=DEVICE)
    cu_seqlens = torch.tensor([0, 29, 69], dtype=torch.int32, device=DEVICE)
    packed = model(torch.cat([first, second], 1), cu_seqlens)
    assert_close("second sequence", model(second), packed[:, 29:], RATIO[torch.float64])


def test_full_attention_matches_masked_softmax():
    torch.manual_seed(1)
    layer = FullCausalAttention(16, num_heads=4, num_kv_heads=2, head_dim=8, device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 11, 16, device=DEVICE, dtype=torch.float64)
    from fsa_compile.compression import rotary_embedding

    positions = torch.arange(11, device=DEVICE)
    q = rotary_embedding(layer.q_proj(x).view(2, 11, 4, 8), positions).transpose(1, 2)
    k = rotary_embedding(layer.k_proj(x).view(2, 11, 2, 8), positions).transpose(1, 2).repeat_interleave(2, 1)
    v = layer.v_proj(x).view(2, 11, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~torch.ones(11, 11, dtype=torch.bool,
                                                                             device=DEVICE).tril(), float("-inf"))
    want = layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
    assert_close("full attention", want, layer(x), RATIO[torch.float64])


@pytest.mark.parametrize("tie", [False, True])
def test_structure_and_initialisation(tie):
    model = make_model("nsa", torch.float32, tie_embeddings=tie, num_layers=4)
    assert isinstance(model.layers[0].attention, FlashSparseAttention)
    assert (model.head.weight is model.embedding.weight) == tie
    attention = model.layers[0].attention
    assert torch.count_nonzero(attention.gate_proj.bias) == 0
    assert attention.compress_key[0, 0, 0].item() == pytest.approx(1 / 8)  # mean pooling over 8 tokens
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.2)
    assert model.config.intermediate_size == 128  # 8/3 * 32 rounded up to a multiple of 64
    full = make_model("full", torch.float32)
    assert isinstance(full.layers[0].attention, FullCausalAttention)


@pytest.mark.parametrize("impl", ["auto", "fsa", "nsa"])
def test_impl_reaches_the_layer(impl):
    model = make_model("nsa", torch.float32, nsa=NSAConfig(**{**NSA.__dict__, "impl": impl}))
    assert all(block.attention.impl == impl for block in model.layers)
    assert model(torch.randint(0, 50, (1, 20), device=DEVICE)).shape == (1, 20, 50)


@pytest.mark.parametrize("attention,packed", [("nsa", False), ("nsa", True), ("full", False)])
def test_compiled_training_step_matches_eager(attention, packed):
    """torch.compile(fullgraph=True) of the whole model: loss and every parameter gradient match eager."""
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    model = make_model(attention, dtype)
    tokens = torch.randint(0, 50, (2, 45), device=DEVICE)
    cu_seqlens = None
    if packed:
        tokens, cu_seqlens = tokens.reshape(1, -1), torch.tensor([0, 31, 90], dtype=torch.int32, device=DEVICE)

    def loss_of(m):
        logits = m(tokens, cu_seqlens)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())

    eager_loss = loss_of(model)
    eager = torch.autograd.grad(eager_loss, model.parameters())
    torch._dynamo.reset()
    compiled_loss = loss_of(torch.compile(model, fullgraph=True))
    compiled = torch.autograd.grad(compiled_loss, model.parameters())
    assert_close("loss", eager_loss, compiled_loss, RATIO[dtype])
    for (name, _), a, b in zip(model.named_parameters(), eager, compiled):
        assert_close(name, a, b, RATIO[dtype])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_kv_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
        (dict(attention="dense"), "attention must be one of"),
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(head_dim=7), "head_dim must be even"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_model(**overrides)


def test_bad_token_shapes():
    model = make_model("nsa", torch.float32)
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        model(torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"must be \[1, total\]"):
        model(torch.zeros(2, 5, dtype=torch.long, device=DEVICE), torch.tensor([0, 5], dtype=torch.int32))
