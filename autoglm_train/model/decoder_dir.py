"""The frozen decoder a plugin trains against: an HF directory, loaded once, checked to stay unchanged."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from autoglm_train.errors import ConfigPathError, ConfigValueError
from autoglm_train.model.decoder import MODALITY_TOKENS

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_decoder_dir(directory: str | Path, dtype: str = "float32", load_in_8bit: bool = False):
    """``(decoder, tokenizer)`` from a Hugging Face directory, in eval mode with no gradients.

    Args:
        directory: a decoder saved by ``recipe=distill`` (``outputs/<run>/student``) or any HF GLM dir.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
        load_in_8bit: int8 weights through bitsandbytes (``Linear8bitLt``; CPU works with bnb >= 0.45).

    Raises:
        FileNotFoundError: no decoder at ``directory``, with the command that makes one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigPathError(
            f"decoder={directory}: no Hugging Face decoder there (no config.json); make one with "
            "`python train.py recipe=distill` (-> outputs/distill/student) or pass decoder=<dir>"
        )
    if dtype not in DTYPES:
        raise ConfigValueError(f"decoder dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    decoder = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, **kwargs)
    decoder.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "decoder %s: %s, %s params, %s%s",
        directory,
        type(decoder).__name__,
        f"{sum(p.numel() for p in decoder.parameters()):,}",
        dtype,
        ", int8 weights" if load_in_8bit else "",
    )
    return decoder, tokenizer


def placeholder_ids(tokenizer) -> dict[str, int]:
    """Reserved modality token → id, for the tokens this tokenizer has."""
    vocab = tokenizer.get_vocab()
    return {token: vocab[token] for token in MODALITY_TOKENS if token in vocab}


def state_digest(module: nn.Module) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()
