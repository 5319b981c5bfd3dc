"""Pick the checkpoint a run resumes from: ``None`` (fresh), ``"last"``/``"auto"`` (newest complete one) or a path.

Lightning's own ``fit(ckpt_path="last")`` trusts the newest ``last*.ckpt`` by mtime; this checks completeness,
orders by the ``global_step`` recorded in the checkpoint, and skips interrupted saves (with a warning; ``last`` also
deletes their scratch directories, :func:`remove_interrupted_writes`). The same
holds for the sharded DeepSpeed / FSDP2 directories (:mod:`autoglm_train.utils.sharded_checkpoint`); ``formats``
keeps a run from picking a checkpoint its strategy cannot read (e.g. after switching ``trainer=ddp`` to ZeRO-3).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from autoglm_train.utils.checkpoint_io import (
    COMPLETE_FILE,
    SCRATCH_RE,
    TENSORS_FILE,
    TREE_FILE,
    CheckpointInfo,
)
from autoglm_train.utils.sharded_checkpoint import checkpoint_format, inspect_any_checkpoint

log = logging.getLogger(__name__)

LAST_ALIASES = ("last", "auto")


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoint-looking entries, plus a previous version left aside by a save that was killed mid-replace."""
    found = []
    for entry in sorted(ckpt_dir.iterdir()):
        scratch = SCRATCH_RE.match(entry.name)
        if scratch:
            # Only an `old` whose replacement never landed still holds the newest complete state.
            if scratch["kind"] == "old" and not os.path.lexists(ckpt_dir / scratch["target"]):
                found.append(entry)
            continue
        looks_like_ckpt = entry.suffix == ".ckpt" or any(
            (entry / name).exists() for name in (COMPLETE_FILE, TREE_FILE, TENSORS_FILE)
        )
        if looks_like_ckpt:
            found.append(entry)
    return found


# What DeepSpeed (`latest`, `checkpoint/`) and torch DCP (`.metadata`, `*.distcp`, `meta.pt`) put in a sharded save.
_SHARDED_ENTRIES = ("latest", "checkpoint", ".metadata", "meta.pt")


def _unmarked_sharded_save(entry: Path) -> bool:
    """A ``*.ckpt`` directory that a DeepSpeed/FSDP2 save started but never marked ``COMPLETE`` (killed mid-write)."""
    if entry.suffix != ".ckpt" or entry.is_symlink() or not entry.is_dir() or (entry / COMPLETE_FILE).exists():
        return False
    names = {p.name for p in entry.iterdir()}
    if names & {TREE_FILE, TENSORS_FILE}:
        return False  # a safetensors directory is never written in place; leave anything odd alone
    return not names or bool(names & set(_SHARDED_ENTRIES)) or any(n.endswith(".distcp") for n in names)


def remove_interrupted_writes(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what killed saves and removals left behind (``.<name>.tmp-*``, ``.<name>.del-*``); returns them.

    Each is a checkpoint-sized directory that no reader uses, so repeated crashes would otherwise fill the disk. Only
    called before a run starts writing (nothing can be mid-save then). An orphaned ``.old-*`` stays: it may hold the
    newest complete state (see :func:`_candidates`). Sharded saves (DeepSpeed, FSDP2) are written in place, so one
    killed before ``COMPLETE`` is a ``step=N.ckpt`` without the marker: removed too, or the resumed run's save of
    step N would land next to it as ``step=N-v1.ckpt`` (Lightning does not overwrite a directory it did not write).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for entry in sorted(ckpt_dir.iterdir()):
        scratch = SCRATCH_RE.match(entry.name)
        if (scratch and scratch["kind"] in ("tmp", "del")) or _unmarked_sharded_save(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # another rank may be removing it too
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.warning("Removed %d interrupted checkpoint write(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def find_last_checkpoint(ckpt_dir: str | os.PathLike[str], formats: Collection[str] | None = None) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir`` (highest global_step, then latest completion), or None.

    ``formats``: only checkpoints of these formats (:func:`.sharded_checkpoint.checkpoint_format` names them).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    by_target: dict[Path, CheckpointInfo] = {}
    for entry in _candidates(ckpt_dir):
        try:
            info = inspect_any_checkpoint(entry)
            fmt = checkpoint_format(entry)
        except (ValueError, FileNotFoundError) as err:
            log.warning("Ignoring checkpoint %s: %s", entry, err)
            continue
        if formats is not None and fmt not in formats:
            log.warning("Ignoring checkpoint %s: format %s, this trainer reads %s", entry, fmt, sorted(formats))
            continue
        # `last.ckpt` may be a symlink to `step=N.ckpt`: report the real directory, which a later link cannot move.
        real = entry.resolve()
        if real not in by_target or by_target[real].path.is_symlink():
            by_target[real] = info
    if not by_target:
        return None
    best = max(by_target.values(), key=lambda i: (-1 if i.global_step is None else i.global_step, i.completed_at))
    return best.path


def resolve_ckpt_path(
    value: str | os.PathLike[str] | None, ckpt_dir: str | os.PathLike[str], formats: Collection[str] | None = None
) -> str | None:
    """Turn the ``ckpt_path`` config value into a path for ``trainer.fit(ckpt_path=...)``.

    Args:
        value: None for a fresh run, ``"last"``/``"auto"`` for the newest complete checkpoint in ``ckpt_dir`` (None
            when there is none yet, so a resubmitted job starts fresh the first time), or an explicit path.
        ckpt_dir: where this run's checkpoints are written.
        formats: checkpoint formats the trainer can load (``trainer_factory.checkpoint_format``); None = any.

    Raises:
        FileNotFoundError: an explicit path does not exist.
        ValueError: an explicit path is not a complete checkpoint directory, or not of one of ``formats``.
    """
    if value is None:
        return None
    if str(value) in LAST_ALIASES:
        remove_interrupted_writes(ckpt_dir)
        last = find_last_checkpoint(ckpt_dir, formats)
        if last is None:
            log.info("ckpt_path=%s: no complete checkpoint in %s; starting fresh", value, ckpt_dir)
            return None
        log.info("ckpt_path=%s: resuming from %s", value, last)
        return str(last)
    path = Path(value).expanduser()
    inspect_any_checkpoint(path)  # raises with the path in the message
    fmt = checkpoint_format(path)
    if formats is not None and fmt not in formats:
        raise ValueError(f"ckpt_path={path} is a {fmt} checkpoint; this trainer reads {sorted(formats)}")
    log.info("Resuming from %s", path)
    return str(path)
