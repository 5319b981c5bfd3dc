"""Speech plugin: log-mel features → a Conformer-Small-shaped encoder → ``num_tokens`` pooled frames.

Libraries do the signal work: ``scipy.signal.resample_poly`` resamples (:func:`resample`, used for
training data and at serving time alike), transformers' ``ParakeetFeatureExtractor`` computes the
log-mel features and ``ParakeetEncoder`` is the Conformer. Hand-written here: input checks with exact
errors, and :func:`masked_adaptive_pool`, which torch has no masked form of.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from autoglm_train.model.plugin import MissingExtraError, ModalityPlugin


class SpeechPlugin(ModalityPlugin):
    """Waveforms → log-mel → Conformer (``ParakeetEncoder``) → masked adaptive pool to ``num_tokens``.

    The defaults are the Conformer-Small shape (16 blocks, d=144, 4 heads, conv kernel 31,
    FFN 576) with the original Conformer's 4x (40 ms) subsampling. Every clip is cropped or
    zero-padded to ``max_seconds`` so batches have one shape; ``preprocess`` appends a
    frame-validity channel to the log-mel features (the contract carries one tensor) and
    ``encode`` uses it to mask attention and to pool over real frames only, so padding never
    changes a clip's tokens.

    Args:
        name: exact plugin name (the yaml file name).
        hidden_size: the decoder's hidden size.
        placeholder: the reserved audio token, e.g. ``"<|audio|>"``.
        num_tokens: audio tokens per item; a full ``max_seconds`` clip must yield at least this many frames.
        sampling_rate: rate the encoder expects; ``(waveform, sr)`` items are resampled to it.
        num_mel_bins: log-mel bins.
        encoder_hidden_size: Conformer width.
        encoder_layers: Conformer blocks.
        encoder_heads: attention heads.
        conv_kernel_size: depthwise conv kernel; odd, because the encoder pads it 'same'.
        encoder_intermediate_size: feed-forward width.
        subsampling_factor: time reduction of the conv front end (a power of two).
        subsampling_conv_channels: channels of the conv front end.
        max_seconds: clips are cropped/padded to this length.
    """

    modality = "audio"

    def __init__(
        self,
        name: str,
        hidden_size: int,
        placeholder: str,
        num_tokens: int,
        sampling_rate: int = 16000,
        num_mel_bins: int = 80,
        encoder_hidden_size: int = 144,
        encoder_layers: int = 16,
        encoder_heads: int = 4,
        conv_kernel_size: int = 31,
        encoder_intermediate_size: int = 576,
        subsampling_factor: int = 4,
        subsampling_conv_channels: int = 256,
        max_seconds: float = 10.0,
    ) -> None:
        # The base constructor calls build_encoder(), so the shape must be known (and checked) first.
        if conv_kernel_size % 2 == 0:
            raise ValueError(f"plugin {name}: conv_kernel_size must be odd ('same' padding), got {conv_kernel_size}")
        if subsampling_factor < 2 or subsampling_factor & (subsampling_factor - 1):
            raise ValueError(f"plugin {name}: subsampling_factor must be a power of two >= 2, got {subsampling_factor}")
        if sampling_rate < 1 or max_seconds <= 0:
            raise ValueError(f"plugin {name}: sampling_rate and max_seconds must be positive")
        self.sampling_rate = sampling_rate
        self.num_mel_bins = num_mel_bins
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_layers = encoder_layers
        self.encoder_heads = encoder_heads
        self.conv_kernel_size = conv_kernel_size
        self.encoder_intermediate_size = encoder_intermediate_size
        self.subsampling_factor = subsampling_factor
        self.subsampling_conv_channels = subsampling_conv_channels
        self.max_seconds = float(max_seconds)
        # 10 ms hop / 25 ms window, the usual ASR framing, at any sampling rate
        self.hop_length = sampling_rate // 100
        self.win_length = sampling_rate * 25 // 1000
        self.max_samples = round(self.max_seconds * sampling_rate)
        # per-utterance mel normalisation divides by (frames - 1): a clip needs at least two hops
        self.min_samples = 2 * self.hop_length
        frames = self.encoder_frames(self.max_samples)
        if num_tokens > frames:
            raise ValueError(
                f"plugin {name}: a {self.max_seconds:g} s clip gives {frames} encoder frames, fewer than "
                f"num_tokens={num_tokens}; raise max_seconds or lower num_tokens"
            )
        super().__init__(name, hidden_size, placeholder, num_tokens)

    # --- contract ----------------------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        """A randomly initialised Conformer (``ParakeetEncoder``)."""
        try:
            from transformers import ParakeetEncoder, ParakeetEncoderConfig
        except ImportError as exc:
            raise MissingExtraError(self.name, "speech", exc) from exc
        config = ParakeetEncoderConfig(
            hidden_size=self.encoder_hidden_size,
            num_hidden_layers=self.encoder_layers,
            num_attention_heads=self.encoder_heads,
            intermediate_size=self.encoder_intermediate_size,
            conv_kernel_size=self.conv_kernel_size,
            num_mel_bins=self.num_mel_bins,
            subsampling_factor=self.subsampling_factor,
            subsampling_conv_channels=self.subsampling_conv_channels,
            # skipping whole blocks at random suits long ASR pre-training, not short plugin alignment
            layerdrop=0.0,
        )
        return ParakeetEncoder(config)

    @property
    def encoder_dim(self) -> int:
        return self.encoder_hidden_size

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        """Waveforms → ``[B, T, num_mel_bins + 1]``: normalised log-mel plus a last 0/1 frame-validity channel.

        Items are 1-D float (or int PCM) arrays at ``sampling_rate``, or ``(waveform, sr)``
        tuples that are resampled first. Clips longer than ``max_seconds`` are cropped.

        Raises:
            ValueError: naming the index of the first empty, too short, non-finite or malformed clip.
        """
        if len(items) == 0:
            raise ValueError(f"plugin {self.name}: preprocess got no audio")
        waves = [self._waveform(item, index)[: self.max_samples] for index, item in enumerate(items)]
        out = self.feature_extractor(
            waves,
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=self.max_samples,
            return_attention_mask=True,
            return_tensors="pt",
        )
        features = out["input_features"].float()
        valid = out["attention_mask"].to(features.dtype).unsqueeze(-1)
        return torch.cat([features, valid], dim=-1)

    def unpad(self, item: torch.Tensor) -> torch.Tensor:
        """``[T, num_mel_bins + 1]`` → the frames up to the last valid one.

        Padding frames are all zeros (features and validity) and masked in ``encode``, so the
        clip zero-padded back to any length gives the same tokens.
        """
        valid = (item[:, -1] > 0.5).nonzero()
        return item[: int(valid.max()) + 1] if valid.numel() else item[:1]

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, T, num_mel_bins + 1]`` → ``[B, num_tokens, encoder_dim]``."""
        features, valid = inputs[..., :-1], inputs[..., -1] > 0.5
        out = self.encoder(input_features=features.to(self.encoder.dtype), attention_mask=valid.long())
        frame_mask = out.attention_mask.bool()
        return masked_adaptive_pool(out.last_hidden_state, frame_mask, self.num_tokens)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "sampling_rate": self.sampling_rate,
            "num_mel_bins": self.num_mel_bins,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_layers": self.encoder_layers,
            "encoder_heads": self.encoder_heads,
            "conv_kernel_size": self.conv_kernel_size,
            "encoder_intermediate_size": self.encoder_intermediate_size,
            "subsampling_factor": self.subsampling_factor,
            "subsampling_conv_channels": self.subsampling_conv_channels,
            "max_seconds": self.max_seconds,
        }

    # --- helpers -----------------------------------------------------------------------
    @cached_property
    def feature_extractor(self) -> Any:
        """transformers' ``ParakeetFeatureExtractor`` (log-mel), built on first use."""
        try:
            from transformers import ParakeetFeatureExtractor
        except ImportError as exc:
            raise MissingExtraError(self.name, "speech", exc) from exc
        return ParakeetFeatureExtractor(
            feature_size=self.num_mel_bins,
            sampling_rate=self.sampling_rate,
            hop_length=self.hop_length,
            win_length=self.win_length,
            n_fft=1 << (self.win_length - 1).bit_length(),
        )

    def encoder_frames(self, num_samples: int) -> int:
        """Encoder frames for a clip of ``num_samples``: STFT frames, then each stride-2 conv (k=3, pad=1)."""
        frames = num_samples // self.hop_length + 1
        for _ in range(int(math.log2(self.subsampling_factor))):
            frames = (frames - 1) // 2 + 1
        return frames

    def _waveform(self, item: Any, index: int) -> np.ndarray:
        """One raw clip → float32 mono at ``sampling_rate``."""
        where = f"plugin {self.name}: audio {index}"
        rate = self.sampling_rate
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"{where}: expected a waveform or a (waveform, sampling_rate) tuple")
            item, rate = item
            if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate < 1:
                raise ValueError(f"{where}: sampling rate must be a positive int, got {rate!r}")
        try:
            array = np.asarray(item)
        except Exception as exc:
            raise ValueError(f"{where}: cannot read it as a waveform ({exc})") from exc
        if array.dtype.kind in "iu":  # integer PCM (e.g. int16 wav) → [-1, 1)
            array = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
        elif array.dtype.kind != "f":
            raise ValueError(f"{where}: expected float samples, got dtype {array.dtype}")
        if array.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D mono waveform, got shape {array.shape}")
        if array.size == 0:
            raise ValueError(f"{where}: empty audio")
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: has NaN or infinite samples")
        wave = array.astype(np.float32)
        if rate != self.sampling_rate:
            wave = resample(torch.from_numpy(wave), int(rate), self.sampling_rate).numpy()
        if wave.size < self.min_samples:
            raise ValueError(
                f"{where}: {wave.size} samples at {self.sampling_rate} Hz is shorter than the "
                f"{self.min_samples}-sample minimum (two 10 ms hops)"
            )
        return wave


def masked_adaptive_pool(frames: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Adaptive average pooling over each row's valid frames only: ``[B, T, D]`` → ``[B, num_tokens, D]``.

    Token ``i`` averages valid frames ``[floor(i L / n), ceil((i + 1) L / n))``, the same bins as
    ``adaptive_avg_pool1d`` over a row of ``L`` valid frames; a row shorter than ``n`` repeats frames.
    """
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    index = torch.arange(num_tokens, device=frames.device)[None]  # [1, n]
    start = (index * lengths) // num_tokens
    end = ((index + 1) * lengths + num_tokens - 1) // num_tokens
    time = torch.arange(frames.shape[1], device=frames.device)[None, None]  # [1, 1, T]
    weights = ((time >= start[..., None]) & (time < end[..., None])).to(frames.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    # zero padded frames so that nothing non-finite there can leak through a 0 weight
    return weights @ frames.masked_fill(~mask[..., None], 0.0)


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of ``[..., T]`` along the last axis by ``scipy.signal.resample_poly``.

    Polyphase FIR (Kaiser window) with up/down factors ``new_sr / gcd`` and ``orig_sr / gcd``; the
    low-pass sits at the lower Nyquist, so downsampling does not alias, and samples past either
    end count as zeros. Output length is ``ceil(T * new_sr / orig_sr)``, dtype as the input's.
    Training data (``espeak.resample_all``) and serving (``SpeechPlugin.preprocess``) both call this.
    """
    if orig_sr == new_sr:
        return waveform
    from scipy.signal import resample_poly  # scipy.signal takes ~0.3 s to import; text-only runs never need it

    gcd = math.gcd(orig_sr, new_sr)
    samples = waveform.detach().cpu()
    if samples.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; scipy turns float16 into float32
        samples = samples.float()
    out = resample_poly(samples.numpy(), new_sr // gcd, orig_sr // gcd, axis=-1)
    return torch.from_numpy(out).to(device=waveform.device, dtype=waveform.dtype)
