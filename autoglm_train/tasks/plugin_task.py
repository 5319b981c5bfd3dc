"""Training one modality plugin against a frozen decoder: CE on the answer tokens only.

The decoder's weights never change (it has no trainable parameter and stays in eval mode);
gradients flow *through* it into the fused placeholder embeddings and on into the plugin.
Checkpoints hold the plugin's weights only, plus the decoder fingerprint they belong to.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from autoglm_train.data.multimodal.datamodule import IGNORE_INDEX
from autoglm_train.engine.engine import Engine
from autoglm_train.eval.generation import generate_answers, score
from autoglm_train.model.modular import ModularLM
from autoglm_train.model.pin import PluginMismatchError
from autoglm_train.tasks.distill_task import split_lm

log = logging.getLogger(__name__)

DECODER_PREFIX = "model.decoder."


class PluginTask(L.LightningModule):
    """Trains ``model.plugins[plugin]``; everything else in ``model`` is frozen.

    Args:
        model: the decoder with the plugin attached (``ModularLM.add_plugin``), frozen as wanted.
        plugin: the name of the plugin being trained.
        tokenizer: the decoder's tokenizer (to decode greedy answers in validation).
        optimizer: ``partial`` taking the parameters (``conf/optim``).
        scheduler: ``partial`` taking the optimizer and ``num_training_steps``, or None.
        decoder_id: the decoder's identity (config, tokenizer, placeholders, weights), stored in checkpoints;
            resuming against another decoder is refused.
        max_new_tokens: greedy generation length in validation; None = the datamodule's longest training answer.
        frozen_eval: submodules kept in eval mode while training (no dropout in frozen parts).
    """

    def __init__(
        self,
        model: ModularLM,
        plugin: str,
        tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        decoder_id: str,
        max_new_tokens: int | None = None,
        frozen_eval: tuple[torch.nn.Module, ...] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.plugin_name = plugin
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.decoder_id = decoder_id
        self.max_new_tokens = max_new_tokens
        self._frozen_eval = (model.decoder, *frozen_eval)
        self.strict_loading = False  # checkpoints leave the frozen decoder out
        self._val: dict[str, list] = {}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        outside = [n for n in trainable if not n.startswith(f"plugins.{plugin}.")]
        if outside or not trainable:
            raise RuntimeError(f"PluginTask: trainable parameters must be plugin '{plugin}' only; got {outside[:5]}")

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_eval:
            module.eval()
        return self

    # --- loss ---------------------------------------------------------------------------
    def _answer_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the positions that predict answer tokens (the LM head never sees the rest)."""
        embeds = self.model.embed(batch["input_ids"], {self.plugin_name: batch["media"]})
        backbone, head = split_lm(self.model.decoder)
        hidden = backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["labels"] != IGNORE_INDEX
        return head(hidden[mask]).float(), batch["labels"][mask]

    def _gate(self) -> torch.Tensor:
        return self.model.last_gates[self.plugin_name].float().mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, targets = self._answer_logits(batch)
        loss = F.cross_entropy(logits, targets)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/token_accuracy", (logits.argmax(-1) == targets).float().mean(), batch_size=bs)
        self.log(f"train/gate_{self.plugin_name}", self._gate(), prog_bar=True, batch_size=bs)
        return loss

    # --- validation: teacher-forced loss + greedy answers ---------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"nll": [], "tokens": [], "answers": [], "outputs": [], "labels": [], "gates": []}
        # greedy answers come from the serving engine's loop, over the modules being trained
        self._engine = Engine.in_process(
            self.model.decoder, self.tokenizer, {self.plugin_name: self.model.plugins[self.plugin_name]}
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, targets = self._answer_logits(batch)
        self._val["nll"].append(F.cross_entropy(logits, targets, reduction="sum").item())
        self._val["tokens"].append(targets.numel())
        self._val["gates"].append(self._gate().item())
        budget = self.max_new_tokens or self.trainer.datamodule.max_answer_tokens
        outputs = generate_answers(self._engine, batch, self.plugin_name, budget)
        self._val["outputs"] += outputs
        self._val["answers"] += batch["answers"]
        self._val["labels"] += batch["digit_labels"]

    def on_validation_epoch_end(self) -> None:
        self._engine = None  # its CPU head holds a transposed copy of the vocabulary (engine/head.py)
        if not self._val.get("answers"):
            return
        metrics = {
            "val/loss": sum(self._val["nll"]) / max(sum(self._val["tokens"]), 1),
            f"val/gate_{self.plugin_name}": sum(self._val["gates"]) / len(self._val["gates"]),
            **{
                f"val/{k}": v for k, v in score(self._val["answers"], self._val["outputs"], self._val["labels"]).items()
            },
        }
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        log.info("step %d: %s", self.global_step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # --- optimizer and checkpoints ----------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the plugin's tensors: the decoder is read from its own directory, unchanged."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(DECODER_PREFIX)]:
            del state[key]
        checkpoint["decoder_id"] = self.decoder_id
        checkpoint["plugin"] = self.plugin_name
        checkpoint["plugin_config"] = self._plugin_config()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        found = (checkpoint.get("plugin"), checkpoint.get("decoder_id"))
        if found != (self.plugin_name, self.decoder_id):
            raise PluginMismatchError(
                f"checkpoint is for plugin {found[0]!r} on decoder {str(found[1])[:12]}, not plugin "
                f"{self.plugin_name!r} on decoder {self.decoder_id[:12]}; use another run_name or ckpt_path=null"
            )
        saved, now = checkpoint.get("plugin_config", {}), self._plugin_config()
        changed = {k: (saved.get(k), now.get(k)) for k in sorted({*saved, *now}) if saved.get(k) != now.get(k)}
        if changed:
            raise PluginMismatchError(
                f"checkpoint's plugin differs (checkpoint, now): {changed}; use another run_name or ckpt_path=null"
            )

    def _plugin_config(self) -> dict[str, Any]:
        # JSON round trip: tuples become lists, as they come back from the checkpoint
        return json.loads(json.dumps(self.model.plugins[self.plugin_name].config()))
