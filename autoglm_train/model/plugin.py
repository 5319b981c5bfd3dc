"""The modality plugin contract: encoder → projector → gate, fused at placeholder tokens.

A plugin is one ``nn.Module`` subclass plus one ``conf/plugin/<name>.yaml`` whose
``_target_`` names it. Heavy, optional imports live inside ``build_encoder`` so that
importing this package never needs them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from autoglm_train.model.gate import FeatureGate

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "projector", "gate")


class MissingExtraError(ImportError):
    """An optional dependency of a plugin is not installed."""

    def __init__(self, plugin: str, extra: str, cause: Exception) -> None:
        super().__init__(f"plugin '{plugin}' needs {cause.name or cause}: pip install 'autoglm-train[{extra}]'")


class ModalityPlugin(nn.Module, ABC):
    """Encoder + projector into the decoder's hidden size + a learnable gate.

    Every plugin emits exactly ``num_tokens`` feature vectors per item; the text holds the
    same number of ``placeholder`` tokens, so batching never depends on the input.

    Args:
        name: exact plugin name (the yaml file name); also its artifact folder name.
        hidden_size: the decoder's hidden size the projector maps into.
        placeholder: the reserved token that marks where this modality enters the text.
        num_tokens: feature vectors per item (= placeholder tokens per item).
    """

    modality: str = ""
    """What kind of media this plugin takes (``image``, ``audio``, or a name of its own): the server routes
    a request's content parts by it (``image_url``, ``input_audio``, ``input_<modality>``). Empty = the name."""

    def __init__(self, name: str, hidden_size: int, placeholder: str, num_tokens: int) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"plugin {name}: num_tokens must be >= 1, got {num_tokens}")
        self.name = name
        self.hidden_size = hidden_size
        self.placeholder = placeholder
        self.num_tokens = num_tokens
        self.encoder = self.build_encoder()
        dim = self.encoder_dim
        self.projector = nn.Sequential(nn.Linear(dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.gate = FeatureGate(dim)

    # --- what each modality implements -------------------------------------------------
    @abstractmethod
    def build_encoder(self) -> nn.Module:
        """Construct the encoder (import heavy optional packages here)."""

    @property
    @abstractmethod
    def encoder_dim(self) -> int:
        """Width of the encoder's output features."""

    @abstractmethod
    def preprocess(self, items: list[Any]) -> torch.Tensor:
        """Raw items (images, waveforms, ...) → one batched input tensor for ``encode``."""

    @abstractmethod
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Batched inputs → features [B, num_tokens, encoder_dim]."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments, saved next to the weights so the plugin rebuilds itself."""
        return {
            "name": self.name,
            "hidden_size": self.hidden_size,
            "placeholder": self.placeholder,
            "num_tokens": self.num_tokens,
        }

    # --- shared behaviour --------------------------------------------------------------
    def embed(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs → (projected features [B, N, H], gate [B, 1, 1])."""
        features = self.encode(inputs)
        if features.shape[1] != self.num_tokens:
            raise RuntimeError(
                f"plugin {self.name}: encoder gave {features.shape[1]} tokens, expected {self.num_tokens}"
            )
        return self.projector(features), self.gate(features)

    def fuse(
        self, token_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_id: int, inputs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend projected features into the placeholder positions, scaled by the gate.

        ``embeds[p] = tok[p] + gate · (proj - tok[p])`` at placeholder positions: gate 0 keeps
        the decoder's own placeholder embedding (an exact no-op), gate 1 replaces it.
        ``inputs`` has one row per text row that contains placeholders, in order; ``None`` (no media
        of this modality) leaves every position as it is. Returns the new embeddings and the gate values.
        """
        mask = input_ids == placeholder_id
        rows = mask.any(dim=1).nonzero(as_tuple=True)[0]
        counts = mask.sum(dim=1)[rows]
        if inputs is None:
            if rows.numel():
                raise ValueError(f"plugin {self.name}: '{self.placeholder}' placeholders in the text but no media")
            return token_embeds, token_embeds.new_zeros(0)
        if rows.numel() != inputs.shape[0]:
            raise ValueError(
                f"plugin {self.name}: {inputs.shape[0]} inputs for {rows.numel()} rows with "
                f"'{self.placeholder}' placeholders"
            )
        if bool((counts != self.num_tokens).any()):
            raise ValueError(
                f"plugin {self.name}: each item needs exactly {self.num_tokens} '{self.placeholder}' "
                f"tokens, found {counts.tolist()}"
            )
        projected, gate = self.embed(inputs.to(token_embeds.device))
        projected = projected.to(token_embeds.dtype)
        gate = gate.to(token_embeds.dtype)
        current = token_embeds[rows][mask[rows]].view(rows.numel(), self.num_tokens, -1)
        blended = current + gate * (projected - current)
        out = token_embeds.clone()
        row_mask = torch.zeros_like(mask)
        row_mask[rows] = mask[rows]
        out[row_mask] = blended.reshape(-1, blended.shape[-1])
        return out, gate.view(-1)

    def unpad(self, item: torch.Tensor) -> torch.Tensor:
        """One preprocessed item without trailing padding; a batch zero-pads its items back along dim 0.

        The default keeps the item whole. A plugin whose padding is all zeros and masked (so the
        tokens do not depend on it) returns the shorter item: batches then pay for their longest
        item, not for the longest one the plugin accepts.
        """
        return item

    def set_trainable(self, **flags: bool) -> None:
        """Per-component trainable flags, e.g. ``set_trainable(encoder=False, projector=True, gate=True)``."""
        for component, trainable in flags.items():
            if component not in COMPONENTS:
                raise ValueError(f"unknown plugin component '{component}'; expected one of {COMPONENTS}")
            getattr(self, component).requires_grad_(trainable)
