"""Save a decoder as a plain Hugging Face directory (safetensors), atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn


def save_hf_decoder(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """``save_pretrained`` of model + tokenizer into a temp dir, then one rename into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
