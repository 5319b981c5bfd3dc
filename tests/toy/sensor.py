"""A toy "sensor" modality: a fixed-length float vector (e.g. accelerometer stats)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoglm_train.model.plugin import ModalityPlugin


class SensorPlugin(ModalityPlugin):
    """Encodes an ``in_dim`` vector into ``num_tokens`` feature vectors with a small MLP."""

    modality = "sensor"

    def __init__(
        self, name: str, hidden_size: int, placeholder: str, num_tokens: int, in_dim: int = 8, width: int = 16
    ) -> None:
        self.in_dim, self.width = in_dim, width
        super().__init__(name, hidden_size, placeholder, num_tokens)

    def build_encoder(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.in_dim, self.width * self.num_tokens), nn.Tanh())

    @property
    def encoder_dim(self) -> int:
        return self.width

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        """Readings of ``in_dim`` numbers (lists, as a JSON request part carries them) → ``[B, in_dim]``."""
        out = []
        for i, item in enumerate(items):
            try:
                x = torch.as_tensor(item, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"plugin {self.name}: item {i} is not a list of numbers ({err})") from err
            if x.numel() != self.in_dim or not bool(torch.isfinite(x).all()):
                raise ValueError(f"plugin {self.name}: item {i} needs {self.in_dim} finite numbers, got {x.numel()}")
            out.append(x.reshape(self.in_dim))
        return torch.stack(out)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs).view(inputs.shape[0], self.num_tokens, self.width)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "in_dim": self.in_dim, "width": self.width}
