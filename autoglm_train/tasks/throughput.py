"""Training throughput as a callback: tokens/s per device, model TFLOPS and MFU, written to ``throughput.json``.

``python train.py recipe=distill '+callbacks=[{_target_: autoglm_train.tasks.throughput.Throughput}]'``

Each optimizer step is timed from batch start to batch end (CUDA synchronised; data loading and validation are
outside), the first ``warmup_steps`` are dropped (allocator, kernel autotuning, DeepSpeed/FSDP first gathers), and
the median step is reported. MFU divides the model FLOPs of a step by the device's peak for the run's precision,
from Lightning's table of GPUs (``get_available_flops``; ``peak_tflops=`` for a device it does not list, and always
for CPUs). Model FLOPs follow PaLM's MFU convention (recomputation is not counted), see :func:`distill_step_flops`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


def matmul_params(model: nn.Module) -> int:
    """Weights that multiply activations: every ``nn.Linear``, the vocab head included, embeddings (lookups) not.

    Counts whole weights under ZeRO-3 (``ds_numel``) and FSDP2 (a DTensor's ``numel`` is global).
    """
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules() if isinstance(m, nn.Linear))


def attention_flops_per_token(config: Any, seq_len: int) -> int:
    """Forward FLOPs of the score and value products of one token against a ``seq_len`` context, all layers."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 4 * config.num_hidden_layers * heads * head_dim * seq_len


def distill_step_flops(student: nn.Module, teacher: nn.Module | None, batch_size: int, seq_len: int) -> int:
    """Model FLOPs of one distillation step on one device: student forward + backward, teacher forward.

    Per token: student ``3 x (2 N + attention)``, teacher ``2 N_t + attention_t`` (``None`` when a top-k cache
    replaces the teacher), N = :func:`matmul_params`. The KD loss's logits are the heads' matmuls, counted in N.
    """
    student_fwd = 2 * matmul_params(student) + attention_flops_per_token(student.config, seq_len)
    per_token = 3 * student_fwd
    if teacher is not None:
        per_token += 2 * matmul_params(teacher) + attention_flops_per_token(teacher.config, seq_len)
    return per_token * batch_size * seq_len


class Throughput(L.Callback):
    """Times training steps; logs ``perf/*`` and writes the summary to ``path`` (rank 0) when training ends.

    The task provides ``step_flops(batch) -> int`` for TFLOPS and MFU (the distill task does); without it only
    tokens/s is reported.

    Args:
        path: the JSON summary; ``None`` = ``<trainer.default_root_dir>/throughput.json`` (the run's output dir).
        warmup_steps: first steps left out of the summary.
        peak_tflops: the device's peak for the run's precision when Lightning's table does not know it.
    """

    def __init__(self, path: str | None = None, warmup_steps: int = 3, peak_tflops: float | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"Throughput.warmup_steps={warmup_steps} must be >= 0")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"Throughput.peak_tflops={peak_tflops} must be > 0")
        self.path = path
        self.warmup_steps = warmup_steps
        self.peak_tflops = peak_tflops
        self.steps: list[dict[str, float]] = []
        self._t0 = 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        seconds = time.perf_counter() - self._t0
        ids = batch["input_ids"]
        step_flops = getattr(pl_module, "step_flops", None)
        row = {"seconds": seconds, "tokens": float(ids.numel())}
        if step_flops is not None:
            row["flops"] = float(step_flops(batch))
        self.steps.append(row)
        pl_module.log("perf/tokens_per_s_per_device", row["tokens"] / seconds, batch_size=ids.shape[0])

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        """Median step after warm-up: tokens/s and TFLOPS per device, MFU where the peak is known."""
        timed = self.steps[self.warmup_steps :]
        if not timed:
            raise ValueError(
                f"Throughput: {len(self.steps)} steps ran, all inside warmup_steps={self.warmup_steps}; "
                "train longer or lower warmup_steps"
            )
        seconds = statistics.median(r["seconds"] for r in timed)
        tokens = statistics.median(r["tokens"] for r in timed)
        out: dict[str, Any] = {
            "device": _device_name(trainer.strategy.root_device),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "timed_steps": len(timed),
            "step_seconds_median": seconds,
            "tokens_per_step_per_device": tokens,
            "tokens_per_s_per_device": tokens / seconds,
        }
        if all("flops" in r for r in timed):
            flops = statistics.median(r["flops"] for r in timed)
            out["model_tflops_per_device"] = flops / seconds / 1e12
            peak = self._peak_flops(trainer)
            if peak:
                out["peak_tflops"] = peak / 1e12
                out["mfu"] = flops / seconds / peak
        return out

    def _peak_flops(self, trainer: L.Trainer) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        from lightning.fabric.utilities.throughput import get_available_flops

        device = trainer.strategy.root_device
        dtype = _COMPUTE_DTYPES.get(str(trainer.precision).split("-")[0])
        if device.type != "cuda" or dtype is None:
            return None  # Lightning's CPU figure is a guess; give peak_tflops= for a CPU MFU
        return get_available_flops(device, dtype)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "throughput.json"
        result = self.summary(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        log.info("throughput: %s -> %s", {k: result[k] for k in result if k != "device"}, path)


_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32}
"""The matmul dtype of each ``trainer.precision`` (``bf16-mixed``, ``16-true``, ``32``, ...)."""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{device.type}, {threads} thread{'s' if threads > 1 else ''}"
