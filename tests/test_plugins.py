"""Vision and speech plugins: preprocessing, exact token counts, the zero-gate no-op, artifacts.

Tiny encoder shapes everywhere except the shipped-config and parameter-count tests, which
build the real shapes (a few seconds on CPU) and run at most one short forward.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.nn import functional as F

from autoglm_train.model.pin import PluginMismatchError
from autoglm_train.model.plugin import MissingExtraError, ModalityPlugin
from autoglm_train.model.plugin_io import load_plugin, save_plugin
from autoglm_train.model.plugins import SpeechPlugin, VisionPlugin, resample
from autoglm_train.model.plugins.speech import masked_adaptive_pool
from autoglm_train.model.registry import PLUGIN_CONF_DIR, available_plugins, instantiate_plugin, plugin_config

HIDDEN = 32
PLACEHOLDER_ID = 7
SR = 16000


def tiny_vision(**overrides) -> VisionPlugin:
    """4x4 patch grid (16px, patch 4), pooled to 4 tokens."""
    args = dict(
        name="vision",
        hidden_size=HIDDEN,
        placeholder="<|image|>",
        num_tokens=4,
        image_size=16,
        patch_size=4,
        num_channels=3,
        encoder_hidden_size=32,
        encoder_layers=2,
        encoder_heads=2,
        encoder_intermediate_size=64,
    )
    return VisionPlugin(**{**args, **overrides})


def tiny_speech(**overrides) -> SpeechPlugin:
    """0.5 s clips → 51 mel frames → 13 encoder frames, pooled to 4 tokens."""
    args = dict(
        name="speech",
        hidden_size=HIDDEN,
        placeholder="<|audio|>",
        num_tokens=4,
        num_mel_bins=32,
        encoder_hidden_size=32,
        encoder_layers=2,
        encoder_heads=2,
        encoder_intermediate_size=64,
        subsampling_conv_channels=16,
        max_seconds=0.5,
    )
    return SpeechPlugin(**{**args, **overrides})


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(count)]


def clips(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(SR * (0.2 + 0.1 * i)))).astype(np.float32) for i in range(count)]


KINDS: dict[str, tuple[Callable[..., ModalityPlugin], Callable[..., list]]] = {
    "vision": (tiny_vision, images),
    "speech": (tiny_speech, clips),
}


def fusion_batch(plugin: ModalityPlugin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three text rows: rows 0 and 2 carry one item's placeholders each, row 1 is text only."""
    n = plugin.num_tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50, (3, n + 6), generator=generator)
    ids[0, 2 : 2 + n] = PLACEHOLDER_ID
    ids[2, 5 : 5 + n] = PLACEHOLDER_ID
    embeds = torch.randn(3, n + 6, plugin.hidden_size, generator=generator)
    return embeds, ids, ids == PLACEHOLDER_ID


# --- the package contract ---------------------------------------------------------------
def test_importing_plugins_does_not_import_transformers() -> None:
    code = "import sys, autoglm_train.model.plugins; assert 'transformers' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["vision", "speech"])
def test_missing_transformers_names_the_extra(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `from transformers import ...` fail
    with pytest.raises(MissingExtraError, match=rf"autoglm-train\[{kind}\]"):
        KINDS[kind][0]()


# --- vision -----------------------------------------------------------------------------
def test_vision_preprocess_accepts_arrays_and_pil() -> None:
    plugin = tiny_vision()
    items = [
        np.full((28, 28), 255, dtype=np.uint8),  # white grayscale → replicated to 3 channels
        np.zeros((40, 30, 3), dtype=np.float64),  # black float RGB, non-square
        np.full((20, 20, 4), 255, dtype=np.uint8),  # RGBA: alpha dropped
        Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).convert("P"),  # palette → RGB
        Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)),
    ]
    out = plugin.preprocess(items)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    # (x - 0.5) / 0.5: white is 1, black -1 (antialiased resizing is exact only up to float rounding)
    torch.testing.assert_close(out[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(out[1], -torch.ones(3, 16, 16))
    torch.testing.assert_close(out[2], out[4])


def test_vision_rgb_to_one_channel_uses_luma() -> None:
    plugin = tiny_vision(num_channels=1, mean=0.0, std=1.0)
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = plugin.preprocess([red])
    assert out.shape == (1, 1, 16, 16)
    torch.testing.assert_close(out, torch.full((1, 1, 16, 16), 0.299))


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 6, 8, 16])
def test_vision_encode_gives_exactly_num_tokens(num_tokens: int) -> None:
    plugin = tiny_vision(num_tokens=num_tokens)
    features = plugin.encode(plugin.preprocess(images(2)))
    assert features.shape == (2, num_tokens, 32)


def test_vision_full_grid_is_the_patch_features() -> None:
    plugin = tiny_vision(num_tokens=16).eval()
    pixels = plugin.preprocess(images(2))
    patches = plugin.encoder(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.equal(plugin.encode(pixels), patches)


def test_vision_conv_stem_keeps_the_patch_grid_and_round_trips(tmp_path) -> None:
    plugin = tiny_vision(num_tokens=16, stem="conv").eval()
    stem = plugin.encoder.embeddings.patch_embeddings.projection
    pixels = plugin.preprocess(images(2))
    # log2(4) = 2 stride-2 convolutions: 16px → the same 4x4 grid the linear patch embedding makes
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in stem) == 2
    assert stem(pixels).shape == (2, 32, 4, 4)
    assert plugin.encode(pixels).shape == (2, 16, 32)
    folder = save_plugin(plugin, tmp_path / "vision", decoder_fingerprint="d")
    loaded = load_plugin(folder, decoder_fingerprint="d").eval()
    assert loaded.config()["stem"] == "conv"
    with torch.no_grad():
        assert torch.equal(loaded.encode(pixels), plugin.encode(pixels))


def test_vision_conv_stem_builds_for_a_width_that_is_not_a_multiple_of_8() -> None:
    # width 100: stem widths 12 → 24, which GroupNorm with a fixed 8 groups would refuse
    plugin = tiny_vision(stem="conv", encoder_hidden_size=100)
    assert plugin.encode(plugin.preprocess(images(2))).shape == (2, 4, 100)


def test_vision_conv_stem_output_does_not_depend_on_the_batch() -> None:
    """GroupNorm, not BatchNorm: an image encodes the same alone or in a batch, in train mode too."""
    plugin = tiny_vision(stem="conv").train()
    pixels = plugin.preprocess(images(3))
    with torch.no_grad():
        together = plugin.encoder.embeddings.patch_embeddings(pixels)
        alone = plugin.encoder.embeddings.patch_embeddings(pixels[:1])
    torch.testing.assert_close(alone, together[:1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"stem": "resnet"}, "expected one of"), ({"stem": "conv", "patch_size": 3, "image_size": 12}, "power of 2")],
)
def test_vision_bad_stem_is_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_vision(**overrides)


@pytest.mark.parametrize("num_tokens", [5, 17, 64])
def test_vision_num_tokens_must_fit_the_patch_grid(num_tokens: int) -> None:
    with pytest.raises(ValueError, match="does not fit the 4x4 patch grid"):
        tiny_vision(num_tokens=num_tokens)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((0, 5), dtype=np.uint8), "empty image"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.arange(64, dtype=np.float64).reshape(8, 8) / 4, r"must be in \[0, 1\]"),  # sklearn-digits style 0..16
        (np.full((8, 8), 300, dtype=np.int64), "8-bit"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "got shape"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "got shape"),
        ("not an image", "numeric pixels"),
    ],
)
def test_vision_bad_input_names_its_index(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"image 1: .*{message}"):
        tiny_vision().preprocess([images(1)[0], bad])


# --- speech -----------------------------------------------------------------------------
def test_speech_preprocess_pads_crops_and_marks_valid_frames() -> None:
    plugin = tiny_speech()
    short, long = np.full(SR // 5, 0.1, dtype=np.float32), np.ones(SR * 2, dtype=np.float32)
    out = plugin.preprocess([short, long])
    assert out.shape == (2, SR // 2 // 160 + 1, 32 + 1)
    valid = out[..., -1]
    assert set(valid.unique().tolist()) <= {0.0, 1.0}
    assert valid[0].sum() == SR // 5 // 160  # 200 ms of 10 ms hops
    assert valid[1].sum() == SR // 2 // 160  # cropped to max_seconds
    assert torch.equal(out[0, valid[0] == 0, :-1], torch.zeros_like(out[0, valid[0] == 0, :-1]))


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 13])
def test_speech_encode_gives_exactly_num_tokens(num_tokens: int) -> None:
    plugin = tiny_speech(num_tokens=num_tokens)
    features = plugin.encode(plugin.preprocess(clips(3)))
    assert features.shape == (3, num_tokens, 32)
    assert torch.isfinite(features).all()


def test_speech_num_tokens_must_fit_the_clip() -> None:
    with pytest.raises(ValueError, match="fewer than num_tokens=14"):
        tiny_speech(num_tokens=14)


def test_speech_padding_does_not_change_tokens() -> None:
    """The same clip padded to 0.5 s or to 1 s gives the same tokens: padding is masked, not attended."""
    plugin = tiny_speech().eval()
    longer = tiny_speech(max_seconds=1.0).eval()
    longer.load_state_dict(plugin.state_dict())
    clip = clips(1)[0]
    with torch.no_grad():
        a = plugin.encode(plugin.preprocess([clip]))
        b = longer.encode(longer.preprocess([clip]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_speech_accepts_resampled_tuples_and_int_pcm() -> None:
    plugin = tiny_speech()
    t = np.arange(22050 * 3 // 10) / 22050
    pcm = (np.sin(2 * np.pi * 220 * t) * 2**14).astype(np.int16)
    out = plugin.preprocess([(pcm, 22050)])
    assert out[0, :, -1].sum() == 16000 * 3 // 10 // 160


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros(0, dtype=np.float32), "empty audio"),
        (np.array([0.1, np.inf] * 200, dtype=np.float32), "NaN or infinite"),
        (np.zeros((2, 8000), dtype=np.float32), "1-D mono"),
        (np.zeros(100, dtype=np.float32), "shorter than"),
        ((np.zeros(8000, dtype=np.float32), 0), "positive int"),
        ((np.zeros(8000, dtype=np.float32), 16000.0), "positive int"),
        ((np.zeros(8000, dtype=np.float32),), "tuple"),
        (np.array(["a"] * 8000), "float samples"),
    ],
)
def test_speech_bad_input_names_its_index(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"audio 1: .*{message}"):
        tiny_speech().preprocess([clips(1)[0], bad])


def test_resample_22050_to_16000_length_and_fidelity() -> None:
    assert resample(torch.zeros(22050), 22050, 16000).shape == (16000,)
    assert resample(torch.zeros(2, 12345), 22050, 16000).shape == (2, math.ceil(12345 * 16000 / 22050))
    tone = torch.sin(2 * math.pi * 440 * torch.arange(22050, dtype=torch.float64) / 22050)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(16000, dtype=torch.float64) / 16000)
    # edges see the zero padding; the interior must be the same tone at the new rate
    torch.testing.assert_close(resample(tone, 22050, 16000)[500:-500], expected[500:-500], atol=2e-3, rtol=0)


def test_resample_removes_content_above_the_new_nyquist() -> None:
    tone = torch.sin(2 * math.pi * 10000 * torch.arange(22050, dtype=torch.float64) / 22050)  # > 8 kHz
    assert resample(tone, 22050, 16000)[500:-500].pow(2).mean().sqrt() < 0.01


def test_masked_adaptive_pool_matches_torch_and_ignores_padding() -> None:
    frames = torch.randn(2, 13, 5)
    full = torch.ones(2, 13, dtype=torch.bool)
    for n in (1, 4, 13, 20):
        expected = F.adaptive_avg_pool1d(frames.transpose(1, 2), n).transpose(1, 2)
        torch.testing.assert_close(masked_adaptive_pool(frames, full, n), expected)
    padded = frames.clone()
    padded[1, 7:] = float("nan")
    mask = full.clone()
    mask[1, 7:] = False
    pooled = masked_adaptive_pool(padded, mask, 4)
    expected = F.adaptive_avg_pool1d(frames[1:, :7].transpose(1, 2), 4).transpose(1, 2)
    torch.testing.assert_close(pooled[1:], expected)


# --- shared plugin behaviour, for both modalities ---------------------------------------
@pytest.mark.parametrize("kind", ["vision", "speech"])
def test_fresh_plugin_is_an_exact_no_op(kind: str) -> None:
    make, items = KINDS[kind]
    plugin = make()
    embeds, ids, _ = fusion_batch(plugin)
    out, gate = plugin.fuse(embeds, ids, PLACEHOLDER_ID, plugin.preprocess(items(2)))
    assert torch.equal(out, embeds)
    assert torch.equal(gate, torch.zeros(2))


@pytest.mark.parametrize("kind", ["vision", "speech"])
def test_open_gate_changes_only_placeholders(kind: str) -> None:
    make, items = KINDS[kind]
    plugin = make()
    with torch.no_grad():
        plugin.gate.proj.bias.fill_(0.5)
    embeds, ids, mask = fusion_batch(plugin)
    out, gate = plugin.fuse(embeds, ids, PLACEHOLDER_ID, plugin.preprocess(items(2)))
    torch.testing.assert_close(gate, torch.full((2,), math.tanh(0.5)))
    assert (out != embeds).any(dim=-1)[mask].all()
    assert torch.equal(out[~mask], embeds[~mask])


@pytest.mark.parametrize("kind", ["vision", "speech"])
def test_set_trainable_freezes_only_the_encoder(kind: str) -> None:
    plugin = KINDS[kind][0]()
    plugin.set_trainable(encoder=False, projector=True, gate=True)
    assert not any(p.requires_grad for p in plugin.encoder.parameters())
    assert all(p.requires_grad for p in plugin.projector.parameters())
    assert all(p.requires_grad for p in plugin.gate.parameters())


@pytest.mark.parametrize("kind", ["vision", "speech"])
def test_save_load_round_trip_and_fingerprint(kind: str, tmp_path) -> None:
    make, items = KINDS[kind]
    plugin = make()
    with torch.no_grad():
        plugin.gate.proj.bias.fill_(0.3)  # an open gate, so the comparison covers every component
    folder = save_plugin(plugin.eval(), tmp_path / kind, decoder_fingerprint="decoder-a")
    loaded = load_plugin(folder, decoder_fingerprint="decoder-a").eval()
    assert type(loaded) is type(plugin) and loaded.config() == plugin.config()
    inputs = plugin.preprocess(items(2))
    with torch.no_grad():
        for got, want in zip(loaded.embed(inputs), plugin.embed(inputs), strict=True):
            assert torch.equal(got, want)
    with pytest.raises(PluginMismatchError, match="decoder"):
        load_plugin(folder, decoder_fingerprint="decoder-b")


# --- shipped configs and real shapes ----------------------------------------------------
def test_shipped_plugins_are_listed() -> None:
    assert {"vision", "speech"} <= set(available_plugins())


def test_none_yaml_is_an_empty_config() -> None:
    from hydra import compose, initialize_config_dir

    assert OmegaConf.load(PLUGIN_CONF_DIR / "none.yaml") == DictConfig({})
    with initialize_config_dir(config_dir=str(PLUGIN_CONF_DIR.parent), version_base=None):
        cfg = compose(config_name=None, overrides=["+plugin=none"])
    assert not cfg.plugin  # an empty node: falsy, nothing to instantiate


def test_shipped_vision_config_builds_and_encodes_mnist_sized_images() -> None:
    plugin = instantiate_plugin(plugin_config("vision", hidden_size=HIDDEN)).eval()
    assert isinstance(plugin, VisionPlugin)
    assert plugin.token_grid == (plugin.grid, plugin.grid) == (4, 4)  # 32px / patch 8: no pooling needed
    with torch.no_grad():
        projected, _ = plugin.embed(plugin.preprocess(images(1)))
    assert projected.shape == (1, 16, HIDDEN)


def test_shipped_speech_config_builds_and_encodes_a_clip() -> None:
    plugin = instantiate_plugin(plugin_config("speech", hidden_size=HIDDEN)).eval()
    assert isinstance(plugin, SpeechPlugin)
    with torch.no_grad():
        projected, _ = plugin.embed(plugin.preprocess(clips(1)))
    assert projected.shape == (1, 32, HIDDEN)


def test_vit_tiny_full_size_param_count() -> None:
    plugin = VisionPlugin(name="vision", hidden_size=HIDDEN, placeholder="<|image|>", num_tokens=16)
    params = sum(p.numel() for p in plugin.encoder.parameters())
    assert params == 5_524_416
    # the quoted 5.7M is timm's ViT-Tiny, which includes a 1000-class ImageNet head
    assert params + 192 * 1000 + 1000 == pytest.approx(5.7e6, rel=0.01)


def test_conformer_small_full_size_param_count() -> None:
    plugin = SpeechPlugin(name="speech", hidden_size=HIDDEN, placeholder="<|audio|>", num_tokens=32)
    params = sum(p.numel() for p in plugin.encoder.parameters())
    # 16 blocks are 8.1M; the paper's 10.3M Conformer(S) also counts its LSTM decoder
    assert params == pytest.approx(10e6, rel=0.15)
