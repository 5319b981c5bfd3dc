"""The text decoder: a stock transformers GLM causal LM, built from a typed spec.

Keeping the decoder a plain ``GlmForCausalLM`` means every checkpoint is an ordinary
Hugging Face directory that transformers, vLLM and GGUF converters read without our code.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

# Placeholder tokens reserved in every student tokenizer, so a plugin trained later
# (even a modality nobody planned for) finds its slot without resizing the decoder.
MODALITY_TOKENS: tuple[str, ...] = ("<|image|>", "<|audio|>", *(f"<|modality_{i}|>" for i in range(6)))


@dataclass
class DecoderSpec:
    """Shape of the GLM decoder; ``vocab_size=None`` means "take it from the tokenizer"."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int | None = None
    """Per-head width; ``None`` means hidden_size // num_attention_heads."""
    vocab_size: int | None = None
    max_position_embeddings: int = 8192
    partial_rotary_factor: float = 0.5
    """GLM rotates only part of each head (GLM-4: half)."""
    rope_theta: float = 10000.0
    attention_bias: bool = True
    rms_norm_eps: float = 1.5625e-07
    tie_word_embeddings: bool = False
    vocab_multiple: int = 64
    """Round the tokenizer's size up to this, for tensor-core friendly shapes."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"model.partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")

    def padded_vocab(self, tokenizer_size: int) -> int:
        """The decoder's embedding rows for a tokenizer of ``tokenizer_size`` tokens."""
        if self.vocab_size is not None:
            if self.vocab_size < tokenizer_size:
                raise ValueError(
                    f"model.vocab_size={self.vocab_size} is smaller than the tokenizer ({tokenizer_size} tokens)"
                )
            return self.vocab_size
        m = self.vocab_multiple
        return (tokenizer_size + m - 1) // m * m

    def to_hf_config(self, vocab_size: int, pad_token_id: int, eos_token_id: int | list[int] | None = None):
        """The ``transformers.GlmConfig`` for this spec."""
        from transformers import GlmConfig

        return GlmConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            partial_rotary_factor=self.partial_rotary_factor,
            rope_theta=self.rope_theta,
            attention_bias=self.attention_bias,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            attention_dropout=0.0,
        )


def build_decoder(
    spec: DecoderSpec,
    tokenizer_size: int,
    pad_token_id: int,
    eos_token_id: int | list[int] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = torch.float32,
):
    """A freshly initialised ``GlmForCausalLM``; ``device="meta"`` allocates nothing.

    ``device=None, dtype=None`` build wherever the surrounding context puts tensors and in their dtype: the task's
    ``configure_model`` builds the student that way, inside the strategy's context (ZeRO-3's ``zero.Init``).
    """
    config = spec.to_hf_config(spec.padded_vocab(tokenizer_size), pad_token_id, eos_token_id)
    with nullcontext() if device is None else torch.device(device):
        model = new_decoder(config)
    return model if dtype is None or device == "meta" else model.to(dtype)


def new_decoder(config) -> torch.nn.Module:
    """``GlmForCausalLM(config)`` with each weight initialised once, by Hugging Face's init.

    The plain constructor first runs torch's default init on every layer and then overwrites it; skipping that pass
    saves minutes on a 9B student and makes the random draws the same whether the weights are whole (one device,
    DDP, FSDP's rank 0) or partitioned at construction by DeepSpeed's ``zero.Init``. The latter are gathered one
    module at a time and initialised on rank 0 (transformers' ZeRO-3 init), so a ZeRO-3 student starts from the
    weights a DDP student of the same seed starts from.
    """
    from transformers import GlmForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = GlmForCausalLM(config)
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned by deepspeed.zero.Init
        from transformers.integrations.deepspeed import initialize_weights_zero3

        initialize_weights_zero3(model)
    elif not any(p.is_meta for p in model.parameters()):
        model.initialize_weights()
    model.tie_weights()
    return model


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count (tied weights counted once); works on the meta device."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
