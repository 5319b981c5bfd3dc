"""The cross-modal alignment gate: how much of a plugin's signal enters the decoder."""

from __future__ import annotations

import torch
from torch import nn


class FeatureGate(nn.Module):
    """``tanh(w · mean(features) + b)`` per item, with ``w`` and ``b`` starting at zero.

    Starting at exactly zero makes a freshly attached plugin a bit-exact no-op on the
    decoder's logits; the gate then learns, per input, how much to trust the modality.
    """

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [B, N, D] → gate values [B, 1, 1] in (-1, 1)."""
        pooled = features.mean(dim=1)
        return torch.tanh(self.proj(pooled)).unsqueeze(-1)
