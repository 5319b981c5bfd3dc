"""Lightning callback: fake-quant off before ``qat.start_step``, on from it (resume-safe: read from global_step)."""

from __future__ import annotations

import lightning as L

from autoglm_train.quant.qat import set_fake_quant


class QATStartCallback(L.Callback):
    """Switches a QAT-prepared student's fake-quant on at optimizer step ``start_step``.

    The state is derived from ``trainer.global_step`` at every batch, so a resumed run lands in
    the right mode without any callback state in the checkpoint. Validation follows training: a
    student still in its float phase is validated in float.
    """

    def __init__(self, start_step: int = 0) -> None:
        self.start_step = int(start_step)

    def _sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_fake_quant(pl_module, trainer.global_step >= self.start_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._sync(trainer, pl_module)
