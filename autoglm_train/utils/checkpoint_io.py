"""Lightning checkpoints as safetensors directories, written atomically; nothing is ever pickled.

A checkpoint at ``<name>.ckpt`` is a directory holding ``tensors.safetensors`` (every tensor and numpy array),
``tree.json`` (the nested dict, with references to those tensors; the encoding is :mod:`.checkpoint_tree`) and
``COMPLETE`` (written last; records the file sizes so a truncated file is caught before it is read).

How Lightning 2.6 drives this plugin (read from ``lightning/pytorch``):

* ``Trainer(plugins=[SafetensorsCheckpointIO()])`` sets ``trainer.strategy.checkpoint_io``. ``trainer.save_checkpoint``
  -> ``strategy.save_checkpoint`` (global rank 0 only) -> ``checkpoint_io.save_checkpoint(dict, path)``.
* ``ModelCheckpoint`` names paths ``<dirpath>/<filename>.ckpt`` and tests them with ``fs.exists``, which is true for
  directories, so version suffixes (``-v1``) and top-k rotation (``strategy.remove_checkpoint`` ->
  :meth:`SafetensorsCheckpointIO.remove_checkpoint`) work unchanged.
* ``save_last=True`` saves ``last.ckpt`` as a second full checkpoint through this plugin (no file copy), so an
  existing ``last.ckpt`` is replaced atomically here. ``save_last="link"`` removes the old ``last.ckpt``
  (``os.remove`` or ``shutil.rmtree``) and ``os.symlink``\\ s to the newest checkpoint directory, which works for
  directories; only its Windows fallback ``shutil.copy`` would fail on a directory.
* ``fit(ckpt_path=...)`` -> ``strategy.load_checkpoint(path, weights_only=...)`` -> :meth:`load_checkpoint` without a
  ``map_location``; Lightning moves model and optimizer state to the device afterwards, so tensors load on CPU.
* ``fit(ckpt_path="last")`` picks the newest ``last*.ckpt`` by mtime and does not check completeness: use
  :func:`autoglm_train.utils.resume.resolve_ckpt_path` instead.
* ``LightningModule.load_from_checkpoint`` bypasses CheckpointIO and calls ``torch.load``: do not use it on these
  directories; call :meth:`load_checkpoint` and ``load_state_dict(ckpt["state_dict"])``.

Fault injection: :func:`set_fault_hook` installs a callable run at each of :data:`FAULT_POINTS` inside a save or a
removal. Nothing is installed in real runs; ``tests/faults.py`` uses it to SIGKILL a training run mid-write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autoglm_train.utils.checkpoint_tree import TREE_FILE, TreeDecoder, TreeEncoder, prepare_for_safetensors

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.safetensors"
COMPLETE_FILE = "COMPLETE"
FORMAT = "autoglm-train/lightning-checkpoint"
FORMAT_VERSION = 1
# Scratch names next to a checkpoint: `.<name>.tmp-<hex>` (being written), `.<name>.old-<hex>` (previous version moved
# aside during a replace), `.<name>.del-<hex>` (being removed). Readers ignore all but an orphaned `old`.
SCRATCH_RE = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|del)-[0-9a-f]{12}$")

FAULT_POINTS = ("tensors_written", "tree_written", "marker_written", "old_moved_aside", "removing")
"""Where a save can be interrupted: after the tensors, after the tree, after COMPLETE (not yet renamed), between the two
renames of a replace, and inside a removal (renamed to ``.del-*``, not yet deleted)."""
SHARDED_FAULT_POINTS = ("shards_written", "shards_marked", "removing")
"""The same for DeepSpeed/FSDP2 saves (:mod:`autoglm_train.tasks.strategies`): after this rank's shards are written
(``COMPLETE`` not yet), right after rank 0 wrote ``COMPLETE``, and inside the removal of a rotated checkpoint."""
_fault_hook: Callable[[str, Path], None] | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """What a reader needs to pick a checkpoint without loading its tensors."""

    path: Path
    global_step: int | None
    epoch: int | None
    completed_at: float
    """mtime of the ``COMPLETE`` marker: when the checkpoint became visible."""


def _scratch_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}")


def set_fault_hook(hook: Callable[[str, Path], None] | None) -> None:
    """Install ``hook(point, path)``, called at each of :data:`FAULT_POINTS` (None removes it). Tests only."""
    global _fault_hook
    _fault_hook = hook


def fault_point(point: str, path: str | os.PathLike[str]) -> None:
    """Run the installed fault hook (tests only) at ``point`` of a save; nothing happens in real runs."""
    if _fault_hook is not None:
        _fault_hook(point, Path(path))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` onto ``target``; any previous ``target`` survives until the rename succeeded.

    A directory cannot be renamed over a non-empty one, so the old one is moved aside first. A kill between the two
    renames leaves it as ``.<name>.old-*``, which :func:`~autoglm_train.utils.resume.find_last_checkpoint` still finds.
    """
    aside = None
    if os.path.lexists(target):
        aside = _scratch_name(target, "old")
        os.replace(target, aside)
        fault_point("old_moved_aside", aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        if aside is not None and not os.path.lexists(target):
            try:
                os.replace(aside, target)
            except OSError:
                log.exception("Could not move %s back to %s; it stays complete under the old name", aside, target)
        raise
    _fsync(target.parent)
    if aside is not None:
        _remove_path(aside)


def _local_path(path: str | os.PathLike[str]) -> Path:
    if "://" in str(path):
        raise ValueError(f"{path}: SafetensorsCheckpointIO writes local directories only (no remote filesystems)")
    return Path(path)


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Check a checkpoint directory is complete (marker present, file sizes as recorded) without loading tensors.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is not a complete checkpoint directory (incomplete, truncated, or a pickle file).
    """
    root = _local_path(path)
    if not root.exists():  # also a dangling `last.ckpt` link
        raise FileNotFoundError(f"Checkpoint not found: {root}")
    if not root.is_dir():
        raise ValueError(
            f"Checkpoint {root} is not a safetensors checkpoint directory (a torch pickle file?); refusing to load it"
        )
    marker = root / COMPLETE_FILE
    if not marker.is_file():
        raise ValueError(f"Checkpoint {root} is incomplete (no {COMPLETE_FILE} marker): an interrupted save?")
    try:
        expected = json.loads(marker.read_text())["files"]
        for name, size in expected.items():
            actual = (root / name).stat().st_size if (root / name).is_file() else None
            if actual != size:
                raise ValueError(f"{name} has {actual} bytes, {COMPLETE_FILE} recorded {size}")
        with (root / TREE_FILE).open() as f:
            header = json.load(f)
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"Checkpoint {root} is corrupt: {err}") from err
    if header.get("format") != FORMAT:
        raise ValueError(f"Checkpoint {root} has format {header.get('format')!r}, expected {FORMAT!r}")
    return CheckpointInfo(root, header.get("global_step"), header.get("epoch"), marker.stat().st_mtime)


def _device_for(map_location: Any) -> str:
    """safetensors takes one device; Lightning's callable/dict remaps mean "keep the storage" -> CPU here."""
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device, int)):
        return str(torch.device(map_location))
    log.debug("map_location=%r is not a device; loading checkpoint tensors on CPU", map_location)
    return "cpu"


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that never pickles: ``Trainer(plugins=[SafetensorsCheckpointIO()])``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` as a directory at ``path``, atomically.

        Raises:
            TypeError: a value cannot be stored; the message names its key path, e.g. ``callbacks/X/foo``.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = _local_path(path)
        encoder = TreeEncoder()  # encode first: an unsupported value fails before anything touches the disk
        tree = encoder.encode(checkpoint, "")
        tensors, raw_dtypes = prepare_for_safetensors(encoder.tensors)
        raw = {k: {"dtype": d, "shape": list(encoder.tensors[k].shape)} for k, d in raw_dtypes.items()}
        step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "global_step": step if type(step) is int else None,
            "epoch": epoch if type(epoch) is int else None,
            "raw_tensors": raw,
            "tree": tree,
        }

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _scratch_name(target, "tmp")
        tmp.mkdir()
        try:
            save_file(tensors, tmp / TENSORS_FILE, metadata={"format": FORMAT})
            fault_point("tensors_written", tmp)
            (tmp / TREE_FILE).write_text(json.dumps(header, allow_nan=False))
            fault_point("tree_written", tmp)
            sizes = {name: (tmp / name).stat().st_size for name in (TENSORS_FILE, TREE_FILE)}
            for name in sizes:
                _fsync(tmp / name)
            (tmp / COMPLETE_FILE).write_text(json.dumps({"format": FORMAT, "files": sizes}))
            _fsync(tmp / COMPLETE_FILE)
            _fsync(tmp)
            fault_point("marker_written", tmp)
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.debug("Saved checkpoint %s (%d tensors)", target, len(tensors))

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Rebuild the checkpoint dict; tensors land on ``map_location`` (a device) or CPU.

        ``weights_only`` is accepted for Lightning's signature; nothing here can execute code anyway.

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: ``path`` is incomplete, corrupt, or not a safetensors checkpoint directory.
        """
        info = inspect_checkpoint(path)
        try:
            tensors = load_file(info.path / TENSORS_FILE, device=_device_for(map_location))
            header = json.loads((info.path / TREE_FILE).read_text())
            return TreeDecoder(tensors, header["raw_tensors"]).decode(header["tree"])
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ValueError(f"Checkpoint {info.path} is corrupt: {err}") from err

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove a checkpoint (directory, symlink or stray file); renamed first so no half-deleted one is seen."""
        target = _local_path(path)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            doomed = _scratch_name(target, "del")
            os.replace(target, doomed)
            fault_point("removing", doomed)
            shutil.rmtree(doomed)
        else:
            log.debug("Checkpoint %s already gone", target)
