"""Every rank's random state in the checkpoint, so a resumed run draws what the uninterrupted one would have.

Lightning saves no random state. Resume already restores weights, optimizer, schedulers, loop counters and the data
position (``ResumableLoader``); without this callback, anything that draws random numbers during training (dropout,
on-policy sampling) would draw from the state ``seed_everything`` left after building the model, not from where the
interrupted run stood. Each rank's torch/numpy/Python (and CUDA) states are gathered into the checkpoint (rank 0 writes
the callback state for every strategy); a rank restores its own entry right before its first step after resume.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

log = logging.getLogger(__name__)


class RNGStates(L.Callback):
    """Checkpoint and restore the per-rank random states (see module doc)."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while the checkpoint dict is built, so the gather is a matched collective.
        local = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)  # in memory only; the file stays safetensors
        else:
            gathered = [local]
        return {"per_rank": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict.get("per_rank") or [])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            log.warning(
                "checkpoint holds random states of %d rank(s), this run has %d: rank %d keeps its seeded state",
                len(states),
                trainer.world_size,
                rank,
            )
            return
        state = dict(states[rank])
        if "torch.cuda" in state and not torch.cuda.is_available():
            state.pop("torch.cuda")
        _set_rng_states(state)
