"""Test-only Lightning callbacks: record each step's loss durably, and die hard at a step."""

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
