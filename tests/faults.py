"""Test-only Lightning callbacks: record each step's loss durably; die hard at a step or inside a checkpoint write;
send a preemption signal mid-step. Distributed runs: ``rank`` picks the one rank that acts, ``group=True`` kills every
rank at once (the run must lead its own process group: ``subprocess.Popen(..., start_new_session=True)``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import lightning as L


def _kill_group_or_self(group: bool, sig: int = signal.SIGKILL) -> None:
    if not group:
        os.kill(os.getpid(), sig)
        return
    leader = os.environ.get("AUTOGLM_LAUNCHER_PID")
    pgid = os.getpgid(0)
    if leader is None or pgid != int(leader):
        raise RuntimeError(f"group kill: process group {pgid} is not led by the run's launcher ({leader}); refusing")
    os.killpg(pgid, sig)


def _note(path: str | None, row: dict) -> None:
    """Append ``row`` to ``path`` (fsynced) so the script sees when and where a fault fired."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**row, "t": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class LossRecorder(L.Callback):
    """Append ``{"step", "loss", "rank", "rng", "batch"}`` per optimizer step to a JSONL file, fsynced (survives
    SIGKILL).

    ``rng``: a hash of this rank's torch random state when the step began, ``batch``: of its input ids, so a resumed run
    can be checked to draw the same numbers and read the same data as an uninterrupted one.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._rng = self._batch = ""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        self._rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self._batch = hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:12] if ids is not None else ""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "loss": float(loss), "rank": trainer.global_rank, "rng": self._rng}
        row["batch"] = self._batch
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class KillAtStep(L.Callback):
    """SIGKILL once ``step`` optimizer steps are done (``mid=True``: inside step ``step``, after its backward and
    before its optimizer update). ``rank``: only that rank dies; ``group``: every rank dies. No cleanup runs."""

    def __init__(
        self,
        step: int,
        rank: int | None = None,
        mid: bool = False,
        group: bool = False,
        note: str | None = None,
        sig: str = "SIGKILL",
    ) -> None:
        self.step, self.rank, self.mid, self.group, self.note = step, rank, mid, group, note
        self.sig = signal.Signals[sig]  # SIGSTOP: the rank hangs instead of dying

    def _fire(self, trainer) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        row = {"event": "kill", "rank": trainer.global_rank, "step": trainer.global_step, "pid": os.getpid()}
        _note(self.note, row)
        _kill_group_or_self(self.group, self.sig)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mid and trainer.global_step + 1 >= self.step:
            self._fire(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.mid and trainer.global_step >= self.step:
            self._fire(trainer)


class SignalAtStep(L.Callback):
    """Send ``sig`` (a preemption signal) inside step ``step``, after its backward: to rank ``rank`` only, or to every
    rank (``group``), once. The run must finish that step, save and exit."""

    def __init__(self, step: int, sig: str = "SIGTERM", rank: int = 0, group: bool = False) -> None:
        self.step, self.sig, self.rank, self.group = step, signal.Signals[sig], rank, group
        self._sent = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._sent or trainer.global_step + 1 < self.step or trainer.global_rank != self.rank:
            return
        self._sent = True
        _kill_group_or_self(self.group, self.sig)


class KillInCheckpointWrite(L.Callback):
    """SIGKILL this process inside the checkpoint writer, at ``point`` of the first save at or after ``step``.

    ``point`` is one of :data:`autoglm_train.utils.checkpoint_io.FAULT_POINTS` (safetensors) or
    :data:`~autoglm_train.utils.checkpoint_io.SHARDED_FAULT_POINTS` (DeepSpeed/FSDP2; ``removing`` fires when top-k
    rotation deletes an old checkpoint, i.e. during a later save). The real writer runs up to that point; no cleanup
    runs. ``group``: every rank of the run dies at that moment.
    """

    def __init__(self, step: int, point: str, group: bool = False) -> None:
        from autoglm_train.utils.checkpoint_io import FAULT_POINTS, SHARDED_FAULT_POINTS

        if point not in FAULT_POINTS + SHARDED_FAULT_POINTS:
            raise ValueError(f"point={point!r}; expected one of {FAULT_POINTS + SHARDED_FAULT_POINTS}")
        self.step, self.point, self.group = step, point, group

    def setup(self, trainer, pl_module, stage: str) -> None:
        from autoglm_train.utils.checkpoint_io import set_fault_hook

        def hook(point: str, path) -> None:
            if point == self.point and trainer.global_step >= self.step:
                _kill_group_or_self(self.group)

        set_fault_hook(hook)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        from autoglm_train.utils.checkpoint_io import set_fault_hook

        set_fault_hook(None)
