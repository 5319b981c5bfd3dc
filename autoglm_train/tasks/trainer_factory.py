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
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from autoglm_train.tasks.precision import check_precision
from autoglm_train.tasks.preemption import Preemption, cluster_environment_plugins
from autoglm_train.tasks.rng_state import RNGStates
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


def fault_tolerance(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.fault_tolerance`` with defaults (signals, requeue, collective timeout); one-line errors for bad values."""
    ft = {
        "signals": ["SIGTERM", "SIGUSR1"],
        "requeue": True,
        "collective_timeout_s": 300.0,
        "rendezvous_timeout_s": 1800.0,
        "heartbeat_s": 1.0,
    }
    ft.update(dict(cfg.get("fault_tolerance") or {}))
    for key in ("collective_timeout_s", "rendezvous_timeout_s", "heartbeat_s"):
        if not float(ft[key]) > 0:
            raise ValueError(f"fault_tolerance.{key}={ft[key]} must be a positive number of seconds")
    ft["signals"] = list(ft["signals"])
    return ft


def _strategy(cfg: DictConfig, timeout_s: float) -> Any:
    """The configured strategy with ``timeout_s`` as its process-group timeout (DDP, DeepSpeed and FSDP2 all take
    ``timeout``): the rendezvous, where ranks may still be loading a large teacher. Once training starts,
    :class:`~autoglm_train.tasks.preemption.Preemption` lowers every group's timeout to the collective timeout."""
    node = cfg.trainer.get("strategy")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return node
    if "timeout" in node:  # set explicitly in the trainer config: keep it
        return instantiate(node)
    return instantiate(node, timeout=timedelta(seconds=timeout_s))


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
    ft = fault_tolerance(cfg)
    preemption = Preemption(
        ft["signals"],
        requeue=ft["requeue"],
        heartbeat_s=ft["heartbeat_s"],
        collective_timeout_s=ft["collective_timeout_s"],
    )
    # Preemption last: the step it stops after is fully recorded by every other callback (Lightning runs
    # ModelCheckpoint after all of them anyway).
    callbacks = [checkpoints, RNGStates(), *configured, *(extra_callbacks or [])]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(preemption)
    extra: dict[str, Any] = {}
    if isinstance(cfg.trainer.get("strategy"), DictConfig):
        extra["strategy"] = _strategy(cfg, float(ft["rendezvous_timeout_s"]))
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        plugins=[SafetensorsCheckpointIO(), *cluster_environment_plugins()],
        default_root_dir=cfg.paths.output_dir,
        **extra,
    )
