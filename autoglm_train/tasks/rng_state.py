"""Every rank's random state in the checkpoint, so a resumed run draws what the uninterrupted one would have.

Lightning saves no random state. Resume already restores weights, optimizer, schedulers, loop counters and the data
position (``ResumableLoader``); without this callback, anything that draws random numbers during training (dropout,
on-policy sampling) would draw from the state ``seed_everything`` left after building the model, not from where the
interrupted run stood. Each rank's torch/numpy/Python (and CUDA) states are gathered into the checkpoint (rank 0 writes
the callback state for every strategy); a rank restores its own entry right before its first step after resume.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def collect() -> dict[str, Any]:
    """This process's random states as tensors and plain numbers only: every checkpoint format stores them, and
    ``torch.load(weights_only=True)`` (FSDP2's ``meta.pt``, DeepSpeed's client state) reads them back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's random states from :func:`collect`'s dict."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStates(L.Callback):
    """Checkpoint and restore the per-rank random states (see module doc)."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while the checkpoint dict is built, so the gather is a matched collective.
        local = collect()
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
        restore(states[rank])
