"""TrainTimeBudget: a real Lightning fit stops on training seconds, not counting validation, and writes its curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from autoglm_train.tasks.wall_clock import TrainTimeBudget

STEP_S = 0.05
VAL_S = 0.3


class _Sleepy(L.LightningModule):
    """Each training step takes ~STEP_S, each validation ~VAL_S: the budget must count only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_S)
        return (self.w - batch["input_ids"].float().mean()) ** 2

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        time.sleep(VAL_S)
        self.log("val/loss", (self.w - 1.0).abs().sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    rows = [{"input_ids": torch.ones(4, dtype=torch.long)} for _ in range(1000)]
    return DataLoader(rows, batch_size=2)


def test_budget_stops_on_training_seconds_and_records_each_validation(tmp_path: Path) -> None:
    budget = TrainTimeBudget(seconds=0.6)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=10_000,
        val_check_interval=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[budget],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Sleepy(), _loader(), _loader())
    out = json.loads((tmp_path / "wall_clock.json").read_text())
    # stopped on the step that crossed 0.6 s of training (~12 steps idle, fewer on a loaded machine), not max_steps
    assert 0.6 <= out["train_seconds"] < 3.0
    assert 2 <= out["steps"] <= 0.6 / STEP_S + 1
    assert out["tokens"] == out["steps"] * 2 * 4  # batch 2 × 4 positions per step
    fit_points = [p for p in out["points"] if p["stage"] == "fit"]  # every 4 steps, and once at the stop
    assert len(fit_points) == -(-out["steps"] // 4) and [p["step"] for p in fit_points] == sorted(
        p["step"] for p in fit_points
    )
    # validation time is real and left out of the training seconds
    assert out["val_seconds"] >= len(fit_points) * VAL_S * 0.9
    assert all("val/loss" in p for p in fit_points)
