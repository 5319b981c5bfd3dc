"""Test-only callback: what each rank sees of the student and the teacher once a strategy has set up."""

from __future__ import annotations

import json
import os
import time

import lightning as L


class PlacementProbe(L.Callback):
    """Append one JSON line per rank at train start (placement, wrapping, optimizer) and per step (wall time)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._t0 = 0.0

    def _write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_train_start(self, trainer, pl_module) -> None:
        teacher = pl_module.teacher
        teacher_params = list(teacher.parameters())
        teacher_ids = {id(p) for p in teacher_params}
        optimizer = trainer.optimizers[0]
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        wrapper = trainer.strategy.model
        self._write(
            {
                "event": "start",
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "wrapper": type(wrapper).__name__,
                "student_class": type(pl_module.student).__name__,
                "student_build": pl_module.student_build,
                "teacher_devices": sorted({str(p.device) for p in teacher_params}),
                "student_device": str(pl_module.device),
                "teacher_in_task_modules": any(m is teacher for m in pl_module.modules()),
                "teacher_in_wrapper_params": any(id(p) in teacher_ids for p in wrapper.parameters()),
                "teacher_in_optimizer": any(id(p) in teacher_ids for p in opt_params),
                "teacher_ds_partitioned": any(hasattr(p, "ds_id") for p in teacher_params),
                "teacher_dtensor": any(type(p.data).__name__ == "DTensor" for p in teacher_params),
                "teacher_numel": sum(getattr(p, "ds_numel", p.numel()) for p in teacher_params),
                "teacher_local_numel": sum(
                    p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher_params
                ),
                "teacher_requires_grad": any(p.requires_grad for p in teacher_params),
                "state_dict_keys_outside_student": [k for k in pl_module.state_dict() if not k.startswith("student.")],
            }
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._t0
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"event": "step", "rank": trainer.global_rank, "step": trainer.global_step, "loss": float(loss)}
        self._write({**row, "s": seconds})
