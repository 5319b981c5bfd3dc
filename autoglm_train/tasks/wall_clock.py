"""A training-time budget as a callback: stop after N seconds of training, record every validation against the
training seconds and tokens behind it (``wall_clock.json``).

``python train.py recipe=distill trainer.max_steps=1000000 trainer.val_check_interval=00:00:00:30
'+callbacks=[{_target_: autoglm_train.tasks.wall_clock.TrainTimeBudget, seconds: 360}]'``

Unlike ``trainer.max_time`` (Lightning's Timer), time spent in validation is not charged to the budget, so runs
compared "at equal wall time" get the same seconds of training however often (or slowly) they validate, and a curve
of a validation metric against training seconds compares methods at equal compute. Every other second from the
start of training counts: data loading, on-policy generation, the teacher's forward, checkpoint writes. The clock
belongs to the process: a resumed run starts a fresh budget.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

VAL_KEYS = ("val/loss", "val/ppl", "val/kl_to_teacher", "val/teacher_top1_agreement")
"""The validation metrics copied into each point (those the task logs)."""


class TrainTimeBudget(L.Callback):
    """Stops training once ``seconds`` of training (validation excluded) have passed; writes the points to ``path``.

    Each point: ``{"stage": "fit" | "validate", "step", "train_seconds", "tokens", "val/...": ...}``, one per
    validation during fit and one per ``trainer.validate`` afterwards (the recipe's final score). ``tokens`` counts
    the positions of the training batches (``input_ids.numel()``), the same for off- and on-policy batches.

    Args:
        seconds: training seconds before the run stops (after the step that crosses it); ``None`` = no budget,
            points only.
        path: the JSON file; ``None`` = ``<trainer.default_root_dir>/wall_clock.json`` (the run's output dir).
    """

    def __init__(self, seconds: float | None = None, path: str | None = None) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError(f"TrainTimeBudget.seconds={seconds} must be > 0 (or null for no budget)")
        self.seconds = seconds
        self.path = path
        self.points: list[dict[str, Any]] = []
        self.tokens = 0
        self.val_seconds = 0.0
        self._start: float | None = None
        self._val_start: float | None = None
        self._stopped_at: float | None = None

    def train_seconds(self) -> float:
        """Seconds since training started, finished validations left out; frozen once training has ended."""
        if self._start is None:
            return 0.0
        now = self._stopped_at if self._stopped_at is not None else time.perf_counter()
        return now - self._start - self.val_seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch["input_ids"].numel())
        if self.seconds is None:
            return
        # Every rank stops after the same step (ranks' clocks differ slightly).
        if trainer.strategy.reduce_boolean_decision(self.train_seconds() >= self.seconds, all=False):
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stopped_at = time.perf_counter()
        self._write(trainer)
        log.info("stopped after %.1f s of training (%.1f s validating)", self.train_seconds(), self.val_seconds)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._val_start is None:
            return
        seconds = time.perf_counter() - self._val_start
        self._val_start = None
        if self._stopped_at is None:
            self.val_seconds += seconds
        metrics = {k: float(trainer.callback_metrics[k]) for k in VAL_KEYS if k in trainer.callback_metrics}
        stage = "fit" if trainer.state.fn == "fit" else "validate"
        self.points.append(
            {
                "stage": stage,
                "step": trainer.global_step,
                "train_seconds": round(self.train_seconds(), 3),
                "tokens": self.tokens,
                "val_seconds": round(seconds, 3),
                **metrics,
            }
        )
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "wall_clock.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "budget_seconds": self.seconds,
            "train_seconds": round(self.train_seconds(), 3),
            "val_seconds": round(self.val_seconds, 3),
            "tokens": self.tokens,
            "steps": trainer.global_step,
            "points": self.points,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(path)
