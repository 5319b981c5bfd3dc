"""The Lightning Trainer every recipe uses: config trainer + checkpoints + logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from autoglm_train.tasks.precision import check_precision
from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir) / CHECKPOINT_DIR


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """Trainer from ``cfg.trainer`` with safetensors checkpoints every N steps, the newest K kept."""
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    every = int(cfg.recipe.checkpoint_every_n_steps)
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir(cfg),
        filename="step={step:06d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=int(cfg.recipe.keep_checkpoints),
        every_n_train_steps=every,
        save_on_train_epoch_end=False,
    )
    logger = instantiate(cfg.logger)
    configured = [instantiate(node) for node in cfg.get("callbacks") or []]
    callbacks = [checkpoints, *configured, *(extra_callbacks or [])]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        plugins=[SafetensorsCheckpointIO()],
        default_root_dir=cfg.paths.output_dir,
    )
