"""The Lightning Trainer every recipe uses: config trainer + checkpoints + logger.

``trainer=cpu|gpu|ddp|deepspeed_zero2|deepspeed_zero3|fsdp`` (``conf/trainer``) pick the strategy; recipes only call
:func:`build_trainer`. Single-device and DDP runs write safetensors checkpoints through
:class:`SafetensorsCheckpointIO`; DeepSpeed and FSDP2 write their own sharded directories (marked ``COMPLETE`` by
:mod:`autoglm_train.tasks.strategies`), and the same plugin only removes old ones.
"""

from __future__ import annotations

import importlib.util
import os
import sys
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


def _strategy_target(cfg: DictConfig) -> str:
    strategy = cfg.trainer.get("strategy")
    if strategy is None:
        return ""
    return str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)


def prepare_strategy(cfg: DictConfig) -> None:
    """What a strategy needs before anything imports its engine; fails in a second with what to install.

    DeepSpeed: installed (the ``scale`` extra), its JIT-compiled ops cached under ``paths.cache_dir`` so they build
    once per machine, and its CPU accelerator selected when ``trainer.accelerator=cpu``.
    """
    target = _strategy_target(cfg)
    if "deepspeed" not in target.lower():
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            f"trainer.strategy={target} needs DeepSpeed: pip install --no-build-isolation 'autoglm-train[scale]'"
        )
    import torch

    # Built ops are only valid for the torch and Python that built them.
    build = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cfg.paths.cache_dir).resolve() / "torch_extensions" / build))
    if cfg.trainer.accelerator == "cpu":
        from autoglm_train.tasks.strategies import use_deepspeed_cpu_accelerator

        use_deepspeed_cpu_accelerator()


def checkpoint_format(trainer: L.Trainer) -> str:
    """The checkpoint format this trainer's strategy writes (and so can resume from)."""
    from autoglm_train.tasks.strategies import DeepSpeedStrategy, FSDP2Strategy
    from autoglm_train.utils.sharded_checkpoint import DCP_FORMAT, DEEPSPEED_FORMAT, SAFETENSORS_FORMAT

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return DEEPSPEED_FORMAT
    if isinstance(strategy, FSDP2Strategy):
        return DCP_FORMAT
    return SAFETENSORS_FORMAT


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """Trainer from ``cfg.trainer`` with checkpoints every N steps, the newest K kept."""
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    prepare_strategy(cfg)
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
