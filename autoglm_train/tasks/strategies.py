"""Lightning's DeepSpeed and FSDP2 strategies, made to run on CPU too and to mark their checkpoints complete.

Nothing here trains differently from Lightning: the classes only lift Lightning's CUDA-only checks on a CPU
accelerator and add a completion marker to the checkpoints the engines write themselves.

* :class:`DeepSpeedStrategy` is Lightning's ``DeepSpeedStrategy``. Lightning refuses any accelerator but CUDA in
  ``setup_environment``, checks CUDA device indices against local ranks in ``setup_distributed`` and hands
  DeepSpeed the CUDA index as ``device_rank`` (``None`` for a CPU device, which DeepSpeed cannot compare). DeepSpeed
  itself runs on CPU with ``DS_ACCELERATOR=cpu`` and gloo, so on a CPU accelerator those two checks are skipped
  and DeepSpeed gets the local rank, as it would without Lightning.
* :class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (FSDP2, which Lightning runs on CPU with gloo)
  with pure data parallelism by default (``data_parallel_size`` = world size, ``tensor_parallel_size=1``), so
  ``trainer.devices``/``trainer.num_nodes`` alone size it. The task applies ``fully_shard`` in ``configure_model``
  (:func:`autoglm_train.tasks.sharding.fully_shard_decoder`).

Both write their own sharded checkpoint directories (DeepSpeed: ``checkpoint/*.pt`` + ``latest``; FSDP2: torch
distributed-checkpoint ``*.distcp`` + ``meta.pt``), not through a ``CheckpointIO``. After every rank has written
its shard, global rank 0 adds ``COMPLETE`` (:mod:`autoglm_train.utils.sharded_checkpoint`), so
:func:`autoglm_train.utils.resume.resolve_ckpt_path` resumes only from finished saves, as for safetensors ones.
Across nodes, ``paths.root_dir`` must be a filesystem every node sees (the engines need that to resume anyway).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies.deepspeed import remove_module_hooks
from torch.nn import Module

from autoglm_train.utils.checkpoint_io import fault_point
from autoglm_train.utils.sharded_checkpoint import (
    DCP_FORMAT,
    DEEPSPEED_FORMAT,
    clear_marker,
    saved_world_size,
    write_marker,
)


def use_deepspeed_cpu_accelerator() -> None:
    """Point DeepSpeed at its CPU accelerator (it reads ``DS_ACCELERATOR`` once, on first use)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ["DS_ACCELERATOR"] != "cpu":
        raise RuntimeError(
            f"trainer.accelerator=cpu with DeepSpeed, but DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}; unset it"
        )
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(real, "ds_accelerator", None) if real else None
    if chosen is not None and chosen._name != "cpu":
        raise RuntimeError(f"DeepSpeed already chose the {chosen._name!r} accelerator; trainer.accelerator=cpu cannot")


class _MarksCompleteCheckpoints:
    """Mixin: clear ``COMPLETE`` before a sharded save, write it on rank 0 once every rank has finished."""

    checkpoint_format: str

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            clear_marker(path)  # a re-save into the same directory must not be vouched for by the old marker
        meta = {"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
        super().save_checkpoint(checkpoint, path, storage_options)  # type: ignore[misc]
        fault_point("shards_written", path)
        self.barrier("sharded-checkpoint-complete")  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            write_marker(path, self.checkpoint_format, world_size=self.world_size, **meta)  # type: ignore[attr-defined]
            fault_point("shards_marked", path)
        self.barrier("sharded-checkpoint-marked")  # type: ignore[attr-defined]


class DeepSpeedStrategy(_MarksCompleteCheckpoints, _LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (same arguments), also on a CPU accelerator.

    ``trainer=deepspeed_zero2|deepspeed_zero3`` build it; ``trainer.accelerator=cpu`` runs it on CPU processes with
    gloo (how the tests run ZeRO here), ``gpu`` is Lightning's own path unchanged.
    """

    checkpoint_format = DEEPSPEED_FORMAT

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            use_deepspeed_cpu_accelerator()
            # Lightning's DeepSpeedStrategy.setup_environment = a CUDA-only check + DDPStrategy.setup_environment.
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_distributed()
            return
        # Lightning's DeepSpeedStrategy.setup_distributed less its CUDA device-index check.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, refused in one line when the checkpoint was written by another number of ranks."""
        saved = saved_world_size(checkpoint_path)
        if saved is not None and saved != self.world_size:
            from autoglm_train.errors import ConfigValueError

            raise ConfigValueError(
                f"ckpt_path={checkpoint_path}: a ZeRO checkpoint of {saved} ranks cannot resume on {self.world_size}: "
                "DeepSpeed reshards only universal checkpoints (deepspeed.checkpoint.ds_to_universal), which "
                "Lightning's DeepSpeedStrategy cannot load; resume on the same number of ranks, or start from "
                "the student (python -m autoglm_train.model.hf_io) with a fresh optimizer"
            )
        return super().load_checkpoint(checkpoint_path, weights_only)

    def _setup_model_and_optimizer(self, model: Module, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        if not isinstance(self.accelerator, CPUAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # Lightning's version, with DeepSpeed's device_rank = local rank (Lightning passes the CUDA index).
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super()._initialize_deepspeed_inference(model)
            return
        # Lightning's version (trainer.validate/test outside fit), with device_rank = local rank as above.
        remove_module_hooks(model)
        self.model = self._inference_engine(model)

    def _inference_engine(self, module: Module) -> Any:
        """A DeepSpeed engine without an optimizer around ``module`` (Lightning's inference set-up, on any device)."""
        import deepspeed

        device_rank = self.local_rank if isinstance(self.accelerator, CPUAccelerator) else self.root_device.index
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self._inference_config(),
            model=module,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )
        return engine

    def _inference_config(self) -> dict[str, Any]:
        """Lightning's DeepSpeed config for a module without an optimizer: precision and ZeRO settings only."""
        assert isinstance(self.config, dict)
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        config.update({k: self.config[k] for k in ("fp16", "bf16") if k in self.config})
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        return config

    def shard_frozen_module(self, module: Module) -> Any:
        """Partition a frozen module (the teacher) over the ranks as ZeRO-3 partitions the student.

        Each rank keeps 1/N of its weights; DeepSpeed's hooks gather a layer's weights while it runs and free them
        after (ZeRO-3 inference, as TRL shards its reference and teacher models). Returns the engine, which must be
        kept alive; the module itself is called as before.
        """
        if not self.zero_stage_3:
            raise ValueError("teacher.shard=true needs ZeRO stage 3 (trainer=deepspeed_zero3)")
        engine = self._inference_engine(module)
        module.eval()
        return engine

    def teardown(self) -> None:
        super().teardown()
        restore_functional_linear()


def restore_functional_linear() -> None:
    """Undo ZeRO-3's process-wide swap of ``torch.nn.functional.linear``.

    ZeRO-3 replaces it with a memory-efficient autograd function ("this will persist unless manually reset") that
    transposes the weight itself; torchao's int8 weights refuse that transpose, so the int8 form of the student
    (``quant.ptq``) failed after any ZeRO-3 run in the same process.
    """
    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
    except ImportError:
        return
    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


class FSDP2Strategy(_MarksCompleteCheckpoints, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` for fully sharded data parallelism (FSDP2) over all ranks.

    Checkpoints are always sharded (each rank writes its part with torch distributed checkpoint): gathering a 9B
    model's optimizer state on rank 0 is what FSDP is there to avoid, and Lightning cannot resume a gathered save
    written through our safetensors CheckpointIO.

    Args:
        data_parallel_size: ranks that shard the model; ``"auto"`` = world size / ``tensor_parallel_size``.
        tensor_parallel_size: ranks per tensor-parallel group; 1 = plain FSDP (the task applies no TP plan).
        process_group_backend: ``None`` = nccl on GPU, gloo on CPU.
        timeout: collective timeout (a ``datetime.timedelta``); ``None`` = torch's default.
    """

    checkpoint_format = DCP_FORMAT

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int = 1,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()
