"""Activation checkpointing as a callback: recompute each decoder layer in backward instead of storing it.

``python train.py recipe=distill '+callbacks=[{_target_: autoglm_train.tasks.recompute.ActivationCheckpointing}]'``

It switches on transformers' own gradient checkpointing (non-reentrant, so it composes with DDP, DeepSpeed and
FSDP2) for every Hugging Face model in the task's module tree when fit starts: after ``configure_model``, where
the distill task builds its student, and before the first step. The frozen
teacher is outside that tree and runs under ``no_grad`` anyway. ``python -m autoglm_train.plan`` shows when it is
needed (the 9B student at 4k tokens: ~28 GB of activations per sequence without, ~4 GB with).
"""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class ActivationCheckpointing(L.Callback):
    """Enable transformers' activation checkpointing (``use_reentrant=False``) on the task's Hugging Face models."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from transformers import PreTrainedModel

        enabled = []
        for name, module in pl_module.named_modules():
            inside_enabled = any(name.startswith(f"{done}.") for done in enabled)  # the outer model covers it
            if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing and not inside_enabled:
                if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5 names it so
                    module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                enabled.append(name)
        if not enabled:
            raise ValueError("ActivationCheckpointing: the task holds no Hugging Face model that supports it")
        log.info("activation checkpointing on: %s", ", ".join(enabled))
