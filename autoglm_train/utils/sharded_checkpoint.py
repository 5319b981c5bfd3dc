"""Checkpoints that DeepSpeed and FSDP2 write themselves: completion markers, and the student out of any of them.

Single-device and DDP runs save through :class:`~autoglm_train.utils.checkpoint_io.SafetensorsCheckpointIO`. DeepSpeed
(``<ckpt>/checkpoint/*.pt`` + ``<ckpt>/latest``) and FSDP2 (torch distributed checkpoint: ``*.distcp`` + ``meta.pt``)
write one shard per rank in their own formats: Lightning offers no CheckpointIO hook for those, and gathering a 9B
model's optimizer state on one rank to write safetensors is what sharding is there to avoid. Their files are torch
pickles: load only checkpoints your own runs wrote (as with any DeepSpeed/FSDP checkpoint).

What this module adds on top:

* ``COMPLETE`` (JSON: format, global_step, epoch, world size, every file's size), written by global rank 0 after all
  ranks finished (:mod:`autoglm_train.tasks.strategies`), so resume skips half-written saves and orders by step
  without unpickling anything (:func:`inspect_sharded_checkpoint`).
* :func:`load_student_state_dict`: the student's full fp32 weights from any checkpoint format (DeepSpeed's own
  ``zero_to_fp32`` for ZeRO-2/3, torch DCP for FSDP2), which
  :func:`autoglm_train.model.hf_io.checkpoint_to_hf_decoder` writes as a plain Hugging Face decoder directory
  (``python -m autoglm_train.model.hf_io CKPT OUT --like RUN/student``; a model concern, so it lives there).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from autoglm_train.utils.checkpoint_io import (
    COMPLETE_FILE,
    FORMAT,
    TREE_FILE,
    CheckpointInfo,
    SafetensorsCheckpointIO,
    inspect_checkpoint,
)

log = logging.getLogger(__name__)

DEEPSPEED_FORMAT = "deepspeed"
DCP_FORMAT = "torch-dcp"
SAFETENSORS_FORMAT = FORMAT
SHARDED_FORMATS = (DEEPSPEED_FORMAT, DCP_FORMAT)
STUDENT_PREFIX = "student."


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != COMPLETE_FILE
    }


def clear_marker(path: str | os.PathLike[str]) -> None:
    """Remove ``COMPLETE`` before a save rewrites ``path``."""
    marker = Path(path) / COMPLETE_FILE
    if marker.is_file():
        marker.unlink()


def write_marker(path: str | os.PathLike[str], fmt: str, *, global_step: Any, epoch: Any, world_size: int) -> None:
    """Write ``COMPLETE`` into a finished sharded checkpoint directory (atomically: temp file + rename)."""
    root = Path(path)
    body = {
        "format": fmt,
        "global_step": global_step if type(global_step) is int else None,
        "epoch": epoch if type(epoch) is int else None,
        "world_size": world_size,
        "files": _files(root),
    }
    tmp = root / f".{COMPLETE_FILE}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, root / COMPLETE_FILE)


def saved_world_size(path: str | os.PathLike[str]) -> int | None:
    """How many ranks wrote a sharded checkpoint (from its ``COMPLETE`` marker); None when not recorded."""
    marker = Path(path) / COMPLETE_FILE
    try:
        value = json.loads(marker.read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if type(value) is int else None


def checkpoint_format(path: str | os.PathLike[str]) -> str:
    """``autoglm-train/lightning-checkpoint`` (safetensors), ``deepspeed`` or ``torch-dcp``; raises if none of them.

    A sharded directory without our marker (written by another tool) is recognised by its engine's own last file.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a checkpoint directory")
    marker = root / COMPLETE_FILE
    if marker.is_file():
        try:
            fmt = json.loads(marker.read_text()).get("format")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"Checkpoint {root} has an unreadable {COMPLETE_FILE}: {err}") from err
        if fmt in SHARDED_FORMATS or fmt == SAFETENSORS_FORMAT:
            return fmt
    if (root / TREE_FILE).is_file():
        return SAFETENSORS_FORMAT
    if (root / "latest").is_file():
        return DEEPSPEED_FORMAT
    if (root / ".metadata").is_file():
        return DCP_FORMAT
    raise ValueError(f"{root} is not a safetensors, DeepSpeed or torch distributed checkpoint")


def inspect_sharded_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Like :func:`~autoglm_train.utils.checkpoint_io.inspect_checkpoint`, for DeepSpeed/FSDP2 directories.

    Raises:
        ValueError: no ``COMPLETE`` marker (an interrupted save), or a file is missing or has another size.
    """
    root = Path(path)
    marker = root / COMPLETE_FILE
    if not marker.is_file():
        raise ValueError(f"Checkpoint {root} is incomplete (no {COMPLETE_FILE} marker): an interrupted save?")
    body = json.loads(marker.read_text())
    if body.get("format") not in SHARDED_FORMATS:
        raise ValueError(f"Checkpoint {root} has format {body.get('format')!r}, expected one of {SHARDED_FORMATS}")
    for name, size in body["files"].items():
        actual = (root / name).stat().st_size if (root / name).is_file() else None
        if actual != size:
            raise ValueError(f"Checkpoint {root} is corrupt: {name} has {actual} bytes, {COMPLETE_FILE} says {size}")
    return CheckpointInfo(root, body.get("global_step"), body.get("epoch"), marker.stat().st_mtime)


def inspect_any_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Completeness check for a checkpoint of any format this project writes."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"Checkpoint not found: {root}")
    if root.is_dir() and (root / COMPLETE_FILE).is_file():
        try:
            fmt = json.loads((root / COMPLETE_FILE).read_text()).get("format")
        except (ValueError, AttributeError):
            fmt = None
        if fmt in SHARDED_FORMATS:
            return inspect_sharded_checkpoint(root)
    return inspect_checkpoint(root)


def load_student_state_dict(path: str | os.PathLike[str], prefix: str = STUDENT_PREFIX) -> dict[str, torch.Tensor]:
    """The student's full weights (keys without ``prefix``) from a checkpoint of any format, on CPU.

    ZeRO-2/3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges the fp32 master partitions of all
    ranks (no process group needed). FSDP2: torch DCP shards are read into one state dict. Raises if the
    checkpoint holds module weights other than the student's (a teacher must never be saved).
    """
    root = Path(path)
    fmt = checkpoint_format(root)
    if fmt == DEEPSPEED_FORMAT:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(root))
    elif fmt == DCP_FORMAT:
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        full = _load_distributed_checkpoint(root)["state_dict"]
    else:
        full = SafetensorsCheckpointIO().load_checkpoint(root)["state_dict"]
    assert_student_only(full.keys(), prefix)
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def assert_student_only(keys: Any, prefix: str = STUDENT_PREFIX) -> None:
    """Raise if any saved module weight is not under ``prefix`` (e.g. a teacher that leaked into the module tree)."""
    stray = sorted(k for k in keys if not k.startswith(prefix))
    if stray:
        more = " ..." if len(stray) > 5 else ""
        raise AssertionError(f"checkpoint holds weights outside {prefix!r}: {stray[:5]}{more}")


def student_from_state_dict(config: Any, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain ``transformers`` causal LM of ``config`` holding ``state_dict`` (strict; tied weights re-tied)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # weights on meta (no 9B allocation), rotary buffers computed
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"state dict does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":  # non-persistent buffers (rotary inv_freq) are not in a state dict
            raise ValueError(f"buffer {name} was not restored")
    return model.eval()
