"""A Llama-style decoder whose attention is the NSA layer (``FlashSparseAttention``) or full causal attention.

Token embedding, ``num_layers`` pre-norm blocks (RMSNorm, attention, RMSNorm, SwiGLU MLP, residuals), a final
RMSNorm and an output head (tied to the embedding or not). Inputs are batched ``[B, T]`` token ids, or packed
``[1, total]`` ids with ``cu_seqlens`` (int32 [N+1]) marking independent sequences; RoPE positions restart at
every sequence start.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsa_compile.compression import rotary_embeddings
from fsa_compile.kv_cache import NSACache
from fsa_compile.modules import FlashSparseAttention
from fsa_compile.ops import SequenceLayout

ATTENTIONS = ("nsa", "full")


@dataclass
class NSAConfig:
    """The NSA branches' settings (see ``FlashSparseAttention``)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    topk: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window_size: int = 512
    impl: str = "auto"


@dataclass
class ModelConfig:
    """A decoder's shape. ``attention`` is ``"nsa"`` (the NSA layer, configured by ``nsa``) or ``"full"``
    (the same q/k/v/o projections and RoPE around full causal SDPA)."""

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_layers: int = 8
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    intermediate_size: int | None = None  # default: 8/3 * hidden_size rounded up to a multiple of 64
    attention: str = "nsa"
    nsa: NSAConfig = field(default_factory=NSAConfig)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.nsa, dict):
            self.nsa = NSAConfig(**self.nsa)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (RoPE), got {self.head_dim}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class FullCausalAttention(nn.Module):
    """The NSA layer's q/k/v/o projections and RoPE around full causal attention (SDPA, GQA).

    forward(x [B, T, hidden], cu_seqlens=None) -> [B, T, hidden]. Packed input (cu_seqlens) builds a
    ``[T, T]`` block-diagonal causal mask, which SDPA's memory-efficient or math backend takes: meant for tests
    and small runs, not long contexts.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float = 10000.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta = num_heads, num_kv_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **factory)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        batch, num_tokens, _ = x.shape
        q = self.q_proj(x).view(batch, num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)
        layout = SequenceLayout(batch, num_tokens, num_tokens, x.device, cu_seqlens)
        q, k = rotary_embeddings((q, k), layout.query_positions, self.rope_theta)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cu_seqlens is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            sequence, tokens = layout.query_sequence, torch.arange(num_tokens, device=x.device)
            mask = (sequence[:, None] == sequence[None, :]) & (tokens[:, None] >= tokens[None, :])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        c = config
        self.attention_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps, **factory)
        if c.attention == "nsa":
            self.attention = FlashSparseAttention(
                c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, rope_theta=c.rope_theta,
                **asdict(c.nsa), **factory,
            )
        else:
            self.attention = FullCausalAttention(
                c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, **factory
            )
        self.mlp_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps, **factory)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, **factory)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, cache: NSACache | None = None,
                lengths: Tensor | None = None) -> Tensor:
        if cache is None:
            x = x + self.attention(self.attention_norm(x), cu_seqlens)
        else:
            x = x + self.attention(self.attention_norm(x), cache=cache, lengths=lengths)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Llama-style decoder. forward(tokens int64 [B, T], cu_seqlens=None) -> logits [B, T, vocab_size].

    Inference: ``cache = model.make_cache(batch_size, max_seqlen)``, then ``model(tokens, cache=cache)`` for each
    chunk of tokens (a prompt, then one token per step) returns their logits, as one full forward would; prompts of
    different lengths go in right-padded with ``lengths`` (int [B], the real tokens of each row)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderBlock(config, **factory) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, **factory)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; the projections that write into the residual stream (attention output,
        MLP down) scaled by ``1 / sqrt(2 * num_layers)``; the NSA layer's gate biases zero (gates start at 0.5)
        and its compression at mean pooling."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        nn.init.normal_(self.embedding.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.layers:
            attention = block.attention
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(attention.o_proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, std=residual_std)
            if isinstance(attention, FlashSparseAttention):
                nn.init.normal_(attention.gate_proj.weight, std=std)
                nn.init.zeros_(attention.gate_proj.bias)
                attention.reset_compression()
            block.attention_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.norm.reset_parameters()

    def make_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> list[NSACache]:
        """One ``NSACache`` per layer (NSA attention only)."""
        if self.config.attention != "nsa":
            raise ValueError(f"a KV cache serves NSA attention; this model has attention={self.config.attention!r}")
        return [NSACache(block.attention, batch_size, max_seqlen, device, dtype) for block in self.layers]

    def forward(self, tokens: Tensor, cu_seqlens: Tensor | None = None, cache: list[NSACache] | None = None,
                lengths: Tensor | None = None) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T] int64, got shape {tuple(tokens.shape)}")
        if cu_seqlens is not None and tokens.shape[0] != 1:
            raise ValueError(f"packed tokens (cu_seqlens given) must be [1, total], got shape {tuple(tokens.shape)}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache must hold one NSACache per layer ({len(self.layers)}), got {len(cache)}")
        x = self.embedding(tokens)
        for i, block in enumerate(self.layers):
            x = block(x, cu_seqlens) if cache is None else block(x, cache=cache[i], lengths=lengths)
        return self.head(self.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
