"""Plain Hugging Face decoder directories (safetensors): written atomically, read one tensor at a time, and
made from any run checkpoint.

The readers serve everything converted from a run's fp32 decoder (the export's forms, the int8 form of
:mod:`autoglm_train.quant.int8_layout`), each straight from the source so that nothing rounds twice.
``python -m autoglm_train.model.hf_io CKPT OUT --like RUN/student`` turns a checkpoint of any format the trainers
write (safetensors, DeepSpeed ZeRO-2/3, FSDP2; read by :mod:`autoglm_train.utils.sharded_checkpoint`) into the
directory transformers, vLLM and the export tool load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
"""The files of a decoder directory besides its weights."""


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


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a Hugging Face decoder directory (save_hf_decoder)")
    return json.loads(path.read_text())


def weight_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (pickled .bin checkpoints are not read)")
    return files


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every weight, one at a time from memory-mapped safetensors."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` without reading any tensor data."""
    from safetensors import safe_open

    shapes = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                sl = f.get_slice(name)
                shapes[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


def checkpoint_to_hf_decoder(
    ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str], like: str | os.PathLike[str]
) -> Path:
    """Write the student of ``ckpt`` as a Hugging Face decoder directory, config + tokenizer taken from ``like``.

    ``like`` is any HF directory of the same shape and tokenizer, e.g. the run's ``student/`` (written at the end of
    every run) or an earlier export.
    """
    from transformers import AutoConfig, AutoTokenizer

    from autoglm_train.utils.sharded_checkpoint import load_student_state_dict, student_from_state_dict

    config = AutoConfig.from_pretrained(like)
    tokenizer = AutoTokenizer.from_pretrained(like)
    model = student_from_state_dict(config, load_student_state_dict(ckpt))
    return save_hf_decoder(model, tokenizer, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A run checkpoint (safetensors, ZeRO-2/3 or FSDP2) -> HF decoder dir")
    parser.add_argument("checkpoint", help="e.g. outputs/distill/checkpoints/step=000050.ckpt")
    parser.add_argument("out_dir", help="where the HF directory is written (replaced atomically)")
    parser.add_argument("--like", required=True, help="HF dir with the same config + tokenizer (the run's student/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(checkpoint_to_hf_decoder(args.checkpoint, args.out_dir, args.like))


if __name__ == "__main__":
    main()
