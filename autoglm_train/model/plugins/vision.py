"""Vision plugin: a ViT-Tiny-shaped encoder whose patch grid is pooled to ``num_tokens`` tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from autoglm_train.model.plugin import MissingExtraError, ModalityPlugin

STEMS = ("patch", "conv")

# ITU-R 601 luma weights, the same PIL uses for mode "L", for feeding RGB into a 1-channel encoder.
_LUMA = (0.299, 0.587, 0.114)


class VisionPlugin(ModalityPlugin):
    """Images → ViT patch features (CLS dropped) → adaptive average pool to exactly ``num_tokens``.

    The encoder is built from ``ViTConfig`` with random weights (no hub download). The
    defaults are the full ViT-Tiny shape (224px, patch 16, dim 192, depth 12, 3 heads).
    Tokens come from pooling the patch grid to an ``h x w`` grid with ``h * w == num_tokens``
    (the most square factorisation), so they keep the image's 2-D layout.

    Args:
        name: exact plugin name (the yaml file name).
        hidden_size: the decoder's hidden size.
        placeholder: the reserved image token, e.g. ``"<|image|>"``.
        num_tokens: image tokens per item; must factor as ``h x w`` with both ``<=`` the patch grid side.
        image_size: side of the square input every image is resized to.
        patch_size: ViT patch side; ``image_size`` must be a multiple of it.
        num_channels: encoder input channels; grayscale is replicated, RGB is reduced to luma for 1.
        encoder_hidden_size: ViT width.
        encoder_layers: ViT depth.
        encoder_heads: attention heads.
        encoder_intermediate_size: MLP width.
        mean: per-channel (or one shared) normalisation mean, applied after scaling to [0, 1].
        std: per-channel (or one shared) normalisation std.
        stem: ``patch`` (ViT's one linear projection per patch) or ``conv`` (a stack of stride-2 3x3
            convolutions, Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): a ViT
            trained from scratch on a few thousand images learns several times faster with it.
    """

    modality = "image"

    def __init__(
        self,
        name: str,
        hidden_size: int,
        placeholder: str,
        num_tokens: int,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        encoder_hidden_size: int = 192,
        encoder_layers: int = 12,
        encoder_heads: int = 3,
        encoder_intermediate_size: int = 768,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        stem: str = "patch",
    ) -> None:
        # The base constructor calls build_encoder(), so the shape must be known (and checked) first.
        if image_size < 1 or patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"plugin {name}: image_size {image_size} must be a positive multiple of patch_size {patch_size}"
            )
        if stem not in STEMS:
            raise ValueError(f"plugin {name}: stem={stem!r}; expected one of {STEMS}")
        if stem == "conv" and patch_size & (patch_size - 1):
            raise ValueError(f"plugin {name}: stem=conv halves the image per layer, so patch_size must be a power of 2")
        if num_channels < 1:
            raise ValueError(f"plugin {name}: num_channels must be >= 1, got {num_channels}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.stem = stem
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_layers = encoder_layers
        self.encoder_heads = encoder_heads
        self.encoder_intermediate_size = encoder_intermediate_size
        self.mean = _per_channel(name, "mean", mean, num_channels)
        self.std = _per_channel(name, "std", std, num_channels)
        if min(self.std) <= 0:
            raise ValueError(f"plugin {name}: std must be > 0, got {self.std}")
        self.grid = image_size // patch_size
        if num_tokens >= 1:
            self.token_grid = _token_grid(name, num_tokens, self.grid)
        super().__init__(name, hidden_size, placeholder, num_tokens)

    # --- contract ----------------------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        """A randomly initialised ``ViTModel`` without the pooler (we pool patches ourselves)."""
        try:
            from transformers import ViTConfig, ViTModel
        except ImportError as exc:
            raise MissingExtraError(self.name, "vision", exc) from exc
        config = ViTConfig(
            hidden_size=self.encoder_hidden_size,
            num_hidden_layers=self.encoder_layers,
            num_attention_heads=self.encoder_heads,
            intermediate_size=self.encoder_intermediate_size,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
        )
        model = ViTModel(config, add_pooling_layer=False)
        if self.stem == "conv":
            model.embeddings.patch_embeddings.projection = ConvStem(
                self.num_channels, self.encoder_hidden_size, self.patch_size
            )
        return model

    @property
    def encoder_dim(self) -> int:
        return self.encoder_hidden_size

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        """Images (numpy HxW / HxWxC, uint8 or float in [0, 1], or PIL) → normalised ``[B, C, S, S]``.

        Raises:
            ValueError: naming the index of the first empty, corrupt or out-of-range image.
        """
        if len(items) == 0:
            raise ValueError(f"plugin {self.name}: preprocess got no images")
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        batch = [(self._image(item, index) - mean) / std for index, item in enumerate(items)]
        return torch.stack(batch)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` → ``[B, num_tokens, encoder_dim]``."""
        hidden = self.encoder(pixel_values=inputs.to(self.encoder.dtype)).last_hidden_state[:, 1:]
        batch, _, dim = hidden.shape
        grid = hidden.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        if self.token_grid != (self.grid, self.grid):
            grid = F.adaptive_avg_pool2d(grid, self.token_grid)
        return grid.flatten(2).transpose(1, 2)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_layers": self.encoder_layers,
            "encoder_heads": self.encoder_heads,
            "encoder_intermediate_size": self.encoder_intermediate_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "stem": self.stem,
        }

    # --- helpers -----------------------------------------------------------------------
    def _image(self, item: Any, index: int) -> torch.Tensor:
        """One raw image → float ``[C, S, S]`` in [0, 1]."""
        where = f"plugin {self.name}: image {index}"
        try:
            array = _as_array(item)
        except Exception as exc:  # a truncated file or an odd object: report which item, keep the cause
            raise ValueError(f"{where}: cannot read it as an image ({exc})") from exc
        if array.dtype.kind not in "buif":
            raise ValueError(f"{where}: expected numeric pixels, got dtype {array.dtype}")
        if array.size == 0:
            raise ValueError(f"{where}: empty image (shape {array.shape})")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"{where}: expected HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
        pixels = torch.from_numpy(_unit_range(array, where)).permute(2, 0, 1)[:3]  # alpha is dropped
        pixels = self._match_channels(pixels, where)
        if pixels.shape[1:] != (self.image_size, self.image_size):
            # antialias: screenshots are far larger than the encoder input; plain bilinear would alias
            pixels = F.interpolate(
                pixels[None],
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0].clamp_(0.0, 1.0)
        return pixels

    def _match_channels(self, pixels: torch.Tensor, where: str) -> torch.Tensor:
        channels = pixels.shape[0]
        if channels == self.num_channels:
            return pixels
        if channels == 1:
            return pixels.expand(self.num_channels, -1, -1)
        if channels == 3 and self.num_channels == 1:
            return (pixels * torch.tensor(_LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        raise ValueError(f"{where}: {channels} channels cannot feed a {self.num_channels}-channel encoder")


class ConvStem(nn.Sequential):
    """``log2(patch_size)`` stride-2 3x3 conv + GroupNorm + ReLU layers, then a 1x1 conv to the ViT width.

    Drop-in for ``ViTPatchEmbeddings.projection``: the same ``[B, C, S, S] → [B, D, S/p, S/p]``
    contract. GroupNorm, not BatchNorm: no running statistics, so a frozen encoder stays frozen
    in train mode and a batch of one encodes like a batch of many.
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int) -> None:
        layers: list[nn.Module] = []
        width = max(out_channels // 8, 8)
        for _ in range(int(math.log2(patch_size))):
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(math.gcd(8, width), width),  # up to 8 groups that divide any width
                nn.ReLU(),
            ]
            in_channels, width = width, min(width * 2, out_channels)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=1))
        super().__init__(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """``ViTModel.forward`` reads the projection's ``weight.dtype`` to cast its input."""
        return self[-1].weight


def _as_array(item: Any) -> np.ndarray:
    """numpy view of an image; PIL images in palette/CMYK/16-bit modes are converted to RGB first."""
    if type(item).__module__.startswith("PIL."):
        if item.mode not in ("L", "RGB", "RGBA"):
            item = item.convert("RGB")
        item.load()
    return np.asarray(item)


def _unit_range(array: np.ndarray, where: str) -> np.ndarray:
    """Pixels → float32 in [0, 1]: integers are 8-bit (0..255); floats must already be in [0, 1].

    Floats are never rescaled by guessing from their range (sklearn digits are 0..16 floats,
    MNIST csv rows are 0..255 ints): an out-of-range float image is an error, not a guess.
    """
    if array.dtype.kind == "b":
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"{where}: integer pixels must be 8-bit (0..255), got range [{low}, {high}]")
        return array.astype(np.float32) / 255.0
    pixels = array.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise ValueError(f"{where}: has NaN or infinite pixels")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{where}: float pixels must be in [0, 1], got range [{low:g}, {high:g}]; "
            "pass uint8 or divide by the maximum first"
        )
    return pixels


def _per_channel(name: str, field: str, value: float | Sequence[float], channels: int) -> tuple[float, ...]:
    values = (float(value),) * channels if isinstance(value, int | float) else tuple(float(v) for v in value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"plugin {name}: {field} has {len(values)} values for {channels} channels")
    return values


def _token_grid(name: str, num_tokens: int, grid: int) -> tuple[int, int]:
    """The most square ``(h, w)`` with ``h * w == num_tokens`` that fits a ``grid x grid`` patch grid."""
    rows = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
    cols = num_tokens // rows
    if cols > grid:
        raise ValueError(
            f"plugin {name}: num_tokens={num_tokens} pools to a {rows}x{cols} grid, which does not fit "
            f"the {grid}x{grid} patch grid (image_size / patch_size); use at most {grid * grid} tokens "
            f"that factor into two sides <= {grid}"
        )
    return rows, cols
