"""Shared pieces of the server tests: a tiny real bundle, media encoders, a real uvicorn in a thread.

The bundle is a micro GLM decoder (real SmolLM2 tokenizer + reserved modality tokens) trained
a few AdamW steps on two sequences, so greedy output is known: a thinking chat answer and a
plain sentence. Plugins are the real vision and speech plugins with tiny encoder shapes.
Built once per test session (a few seconds) under pytest's base temp dir.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import shutil
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import micro_spec

MODEL = "autoglm-test"
KEY = "sk-test-key-1"
OTHER_KEY = "sk-test-key-2"
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
REASONING = "Two and two make four."
ANSWER = "The answer is four."
SENTENCE = "The quick brown fox jumps over the lazy dog."

# The export tool's template is preferred (the one real bundles ship); this copy keeps the
# tests independent of that module's progress.
_FALLBACK_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if not thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)


def thinking_template() -> str:
    try:
        from autoglm_train.model.chat_template import THINKING_CHAT_TEMPLATE
    except ImportError:
        return _FALLBACK_TEMPLATE
    return THINKING_CHAT_TEMPLATE


@dataclass(frozen=True)
class Bundles:
    full: Path
    """manifest.json + decoder/ + plugins/vision + plugins/speech."""
    text_only: Path
    """A plain HF decoder directory (no manifest, no plugins)."""


_BUILT: dict[Path, Bundles] = {}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matmuls run faster on one thread, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_bundles(root: Path, tokenizer) -> Bundles:
    """The test bundles, built once per process under ``root``."""
    if root in _BUILT:
        return _BUILT[root]
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.model.hf_io import save_hf_decoder
    from autoglm_train.model.plugin_io import save_plugin
    from autoglm_train.model.registry import instantiate_plugin, plugin_config

    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer is shared: other tests save decoders with it
    tokenizer.chat_template = thinking_template()
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    texts = [f"{prompt}<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>", SENTENCE]
    with one_thread():
        torch.manual_seed(0)
        spec = micro_spec(max_position_embeddings=4096)
        decoder = build_decoder(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-2)
        for _ in range(60):
            decoder(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        decoder.eval()
        full = root / "bundle"
        save_hf_decoder(decoder, tokenizer, full / "decoder")
        vision = instantiate_plugin(
            plugin_config(
                "vision",
                hidden_size=32,
                num_tokens=4,
                image_size=16,
                patch_size=4,
                encoder_hidden_size=32,
                encoder_layers=1,
                encoder_heads=2,
                encoder_intermediate_size=64,
            )
        )
        speech = instantiate_plugin(
            plugin_config(
                "speech",
                hidden_size=32,
                num_tokens=4,
                num_mel_bins=32,
                encoder_hidden_size=32,
                encoder_layers=1,
                encoder_heads=2,
                encoder_intermediate_size=64,
                subsampling_conv_channels=16,
                max_seconds=0.5,
            )
        )
    plugins = {}
    for plugin in (vision, speech):
        save_plugin(plugin, full / "plugins" / plugin.name)
        plugins[plugin.name] = {"path": f"plugins/{plugin.name}", "placeholder": plugin.placeholder}
    manifest = {"format": "autoglm-bundle", "format_version": 1, "model_name": MODEL, "modules": {"plugins": plugins}}
    (full / "manifest.json").write_text(json.dumps(manifest, indent=2))
    text_only = root / "text-only"
    shutil.copytree(full / "decoder", text_only)
    _BUILT[root] = Bundles(full=full, text_only=text_only)
    return _BUILT[root]


# --- media ------------------------------------------------------------------------------
def png_data_url(seed: int = 0, size: int = 20) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64(seconds: float = 0.3, rate: int = 16000, seed: int = 0) -> str:
    samples = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


# --- metrics ----------------------------------------------------------------------------
def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name{labels}`` in a Prometheus text exposition (label order free), or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None
