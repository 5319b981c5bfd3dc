"""Helpers for the plugin-training tests: a micro GLM decoder saved as a real HF directory."""

from __future__ import annotations

from pathlib import Path

import torch

from autoglm_train.model.decoder import build_decoder
from autoglm_train.model.hf_io import save_hf_decoder
from tests.conftest import micro_spec

TINY_VISION = [
    "plugin.image_size=16",
    "plugin.patch_size=4",
    "plugin.num_tokens=4",
    "plugin.encoder_hidden_size=32",
    "plugin.encoder_layers=1",
    "plugin.encoder_heads=2",
    "plugin.encoder_intermediate_size=64",
]
"""A ViT-Tiny-shaped vision plugin small enough to train a few steps in seconds."""
DIGITS = ["data_mm=digits", "data_mm.source.max_items=80"]
TINY_RUN = [
    "data_mm.batch_size=8",
    "data_mm.eval_batch_size=16",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "recipe.checkpoint_every_n_steps=2",
    "recipe.parity_max_new_tokens=4",
    "optim.scheduler.num_warmup_steps=1",
]
"""A plugin run of 3 steps: every stage of ``recipe=add_modality`` once."""


def save_micro_decoder(directory: Path, tokenizer, seed: int = 0, **spec) -> Path:
    """A micro GLM decoder (hidden 32 unless overridden) with the student tokenizer, saved by save_hf_decoder."""
    torch.manual_seed(seed)
    model = build_decoder(micro_spec(**spec), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return save_hf_decoder(model.eval(), tokenizer, directory)
