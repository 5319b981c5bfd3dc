"""Test-only Lightning callbacks: record each step's loss durably; die hard at a step or inside a checkpoint write."""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class LossRecorder(L.Callback):
    """Append ``{"step", "loss"}`` per optimizer step to a JSONL file, fsynced (survives SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class KillAtStep(L.Callback):
    """SIGKILL this process once ``step`` optimizer steps are done and checkpointed: no cleanup runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInCheckpointWrite(L.Callback):
    """SIGKILL this process inside the checkpoint writer, at ``point`` of the first save at or after ``step``.

    ``point`` is one of :data:`autoglm_train.utils.checkpoint_io.FAULT_POINTS` (``removing`` fires when top-k rotation
    deletes an old checkpoint, i.e. during a later save). The real writer runs up to that point; no cleanup runs.
    """

    def __init__(self, step: int, point: str) -> None:
        from autoglm_train.utils.checkpoint_io import FAULT_POINTS

        if point not in FAULT_POINTS:
            raise ValueError(f"point={point!r}; expected one of {FAULT_POINTS}")
        self.step, self.point = step, point

    def setup(self, trainer, pl_module, stage: str) -> None:
        from autoglm_train.utils.checkpoint_io import set_fault_hook

        def hook(point: str, path) -> None:
            if point == self.point and trainer.global_step >= self.step:
                os.kill(os.getpid(), signal.SIGKILL)

        set_fault_hook(hook)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        from autoglm_train.utils.checkpoint_io import set_fault_hook

        set_fault_hook(None)
