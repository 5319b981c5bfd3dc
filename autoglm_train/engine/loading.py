"""The decoder an engine generates with: loaded, checked against its plugins' pins, its chat template probed.

Two ways in: :func:`load_decoder` reads a serving bundle (the server), :func:`attach_decoder` takes modules
already in memory (training-time evaluation). Both end in the same :class:`LoadedDecoder`, the facts the
rest of the engine reads (where inputs go, the context bound, the end-of-sequence ids, the vocabulary the
sampler may pick from, whether the template thinks).

The pin check (:func:`check_plugin_pins`) runs before the weights are loaded, so a plugin trained against
another decoder stops the server in seconds, not after a 9B load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoglm_train.engine.bundle import BundleInfo
from autoglm_train.engine.quantize import load_serving_decoder
from autoglm_train.model.decoder_dir import placeholder_ids
from autoglm_train.model.manifest import artifact_pin
from autoglm_train.model.pin import DecoderPin, check_pin, pin_decoder
from autoglm_train.model.thinking import template_thinks

log = logging.getLogger(__name__)


@dataclass
class LoadedDecoder:
    """A decoder ready to generate, and what the engine needs to know about it."""

    decoder: nn.Module
    tokenizer: Any
    dtype: torch.dtype
    """The float dtype activations run in."""
    quantization: str | None
    """One line describing the int8 form in use, or None for float weights."""
    device: torch.device
    """Where inputs go: the input embeddings' device (the first GPU when the layers are split across several)."""
    placement: list[str]
    """Every device the decoder's parameters sit on."""
    max_model_len: int
    """Prompt + completion bound: the decoder's context, lowered by the caller's ``max_model_len``."""
    vocab_limit: int
    """Token ids the sampler may produce: the tokenizer's ids that the decoder has rows for."""
    eos_ids: set[int]
    thinking: bool
    """The tokenizer's chat template has a thinking switch (:func:`~autoglm_train.model.thinking.template_thinks`)."""


def load_decoder(
    bundle: BundleInfo, device: str, dtype: str, quantize: str | None, max_model_len: int | None
) -> LoadedDecoder:
    """The bundle's decoder and tokenizer, after its plugins' pins were checked against them.

    Raises:
        PluginMismatchError: a plugin of the bundle was trained against another decoder.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundle.decoder_dir))
    check_plugin_pins(bundle, tokenizer)
    decoder, torch_dtype, quantization = load_serving_decoder(bundle, device, dtype, quantize)
    return attach_decoder(decoder, tokenizer, torch_dtype, quantization, max_model_len)


def attach_decoder(
    decoder: nn.Module,
    tokenizer: Any,
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    max_model_len: int | None = None,
) -> LoadedDecoder:
    """Facts of a decoder already in memory (``dtype`` default: its parameters')."""
    context = int(getattr(decoder.config, "max_position_embeddings", 0) or 2048)
    return LoadedDecoder(
        decoder=decoder.eval(),
        tokenizer=tokenizer,
        dtype=dtype or next(decoder.parameters()).dtype,
        quantization=quantization,
        device=decoder.get_input_embeddings().weight.device,
        placement=sorted({str(p.device) for p in decoder.parameters()}),
        max_model_len=min(max_model_len or context, context),
        vocab_limit=min(len(tokenizer), decoder.config.vocab_size),
        eos_ids=_eos_ids(decoder, tokenizer),
        thinking=template_thinks(tokenizer),
    )


def plugin_pins(bundle: BundleInfo) -> dict[str, DecoderPin | str | None]:
    """What each plugin of ``bundle`` was pinned to, the most complete record first.

    1. the bundle manifest's ``decoder_pin`` for the plugin: the export wrote it (weights digest of the bundle's
       own ``decoder/``) after the plugin's pin matched the source decoder, weights included;
    2. the plugin artifact's ``manifest.json`` (``recipe=add_modality``): the decoder it was trained against;
    3. ``plugin.json``'s ``decoder_fingerprint``: config + tokenizer + placeholder ids, no weights.
    """
    listed = ((bundle.manifest or {}).get("modules") or {}).get("plugins") or {}
    pins: dict[str, DecoderPin | str | None] = {}
    for name, meta in bundle.plugin_meta.items():
        entry = listed.get(name) if isinstance(listed, dict) else None
        if isinstance(entry, dict) and entry.get("decoder_pin"):
            pins[name] = DecoderPin.from_dict(entry["decoder_pin"])
        else:
            folder = bundle.plugin_dirs.get(name)
            pins[name] = (artifact_pin(folder) if folder else None) or meta.get("decoder_fingerprint")
    return pins


def check_plugin_pins(bundle: BundleInfo, tokenizer: Any) -> float:
    """Refuse a bundle whose plugin was trained against another decoder; returns the seconds the check took.

    Where a plugin's pin records the decoder's weights digest, the bundle's decoder weight files are hashed
    (sha256 of every ``*.safetensors`` file, as :func:`~autoglm_train.model.pin.pin_decoder` pinned them), so
    a retrained decoder of the same shape is caught too, not only another shape or tokenizer. That read is
    the start-up cost, linear in the weights' size. Measured on the 2-core AVX2 EPYC these tests run on, files
    in the page cache, 3 runs each: the serving tests' micro decoder (6.4 MB ``model.safetensors``) 7.5 ms with
    the weights hashed vs 3.3 ms without (config + tokenizer only); SmolLM2-135M as an fp32 HF dir (538 MB)
    0.38-0.41 s vs 3.4 ms, i.e. ~1.35 GB/s of sha256. A 9B bf16 decoder (18 GB) would add ~13 s warm; cold,
    the read is disk-bound, but it is the read the weight load that follows needs anyway (page cache).
    Bundles without pinned weights (plain decoder dirs, plugins saved without a manifest) pay nothing.

    Raises:
        PluginMismatchError: naming the plugin and every part of the decoder that differs.
    """
    start = time.perf_counter()
    pins = {name: pin for name, pin in plugin_pins(bundle).items() if pin}
    if not pins:
        return 0.0
    hash_weights = any(isinstance(pin, DecoderPin) and pin.weights_sha256 for pin in pins.values())
    current = pin_decoder(bundle.decoder_dir, placeholder_ids(tokenizer), hash_weights=hash_weights)
    for name, pin in pins.items():
        check_pin(pin, current, f"plugin {name} ({bundle.plugin_dirs.get(name)})")
    seconds = time.perf_counter() - start
    what = "config, tokenizer and weights" if hash_weights else "config and tokenizer"
    log.info("decoder pins of %d plugin(s) checked (%s) in %.2f s", len(pins), what, seconds)
    return seconds


def _eos_ids(decoder: nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(decoder.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
