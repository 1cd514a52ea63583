"""Models built on the NSA layer: a Llama-style decoder (``Transformer``) with NSA or full attention."""

from fsa_compile.models.llama import (
    ATTENTIONS,
    DecoderBlock,
    FullCausalAttention,
    ModelConfig,
    NSAConfig,
    SwiGLU,
    Transformer,
)

__all__ = ["ATTENTIONS", "DecoderBlock", "FullCausalAttention", "ModelConfig", "NSAConfig", "SwiGLU", "Transformer"]
