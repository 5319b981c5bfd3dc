"""Helpers for the plugin-training tests: a micro GLM decoder saved as a real HF directory."""

from __future__ import annotations

from pathlib import Path

import torch

from autoglm_train.model.decoder import build_decoder
from autoglm_train.model.hf_io import save_hf_decoder
from tests.conftest import micro_spec


def save_micro_decoder(directory: Path, tokenizer, seed: int = 0, **spec) -> Path:
    """A micro GLM decoder (hidden 32 unless overridden) with the student tokenizer, saved by save_hf_decoder."""
    torch.manual_seed(seed)
    model = build_decoder(micro_spec(**spec), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return save_hf_decoder(model.eval(), tokenizer, directory)
