"""The modality plugins around an engine's decoder: routed by modality, built on first use, rendered as trained.

A bundle's plugins are known from their ``plugin.json`` alone (placeholder, token count, modality, prompt
format), so a text-only server never builds an encoder; the first request that carries a plugin's media
builds it (weights read) under the engine's lock, since adding a submodule must not race a forward pass.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from autoglm_train.engine.errors import InvalidRequest, PluginUnavailable
from autoglm_train.engine.routing import PluginSlot, plugin_slots
from autoglm_train.model.decoder import MODALITY_TOKENS
from autoglm_train.model.modular import ModularLM
from autoglm_train.model.prompt_format import PromptFormat

log = logging.getLogger(__name__)


class PluginSet:
    """The decoder wrapped with its plugins (:class:`~autoglm_train.model.modular.ModularLM`) and their facts.

    Args:
        decoder: the decoder the plugins fuse into.
        tokenizer: its tokenizer (placeholder tokens must be in its vocabulary).
        meta: plugin name → its ``plugin.json`` (or the same facts of a plugin built in memory).
        lock: the engine's lock, held while a plugin is built.

    Raises:
        ValueError: a plugin cannot attach to this decoder (placeholder not a token, other hidden size), or two
            plugins declare the same modality; refused at start-up, not at the first image.
    """

    def __init__(self, decoder: torch.nn.Module, tokenizer: Any, meta: dict[str, dict[str, Any]], lock) -> None:
        vocab = tokenizer.get_vocab()
        _check_attachable(meta, vocab, decoder.config.hidden_size)
        placeholders = {
            t: vocab[t] for t in {*MODALITY_TOKENS, *(m["placeholder"] for m in meta.values())} if t in vocab
        }
        self.model = ModularLM(decoder, placeholders).eval()  # plugins loaded on demand run in eval mode too
        self.meta = meta
        self.lock: threading.Lock = lock
        self.slots: dict[str, PluginSlot] = plugin_slots(meta)
        """Modality → the plugin that serves it."""
        self.formats = {
            name: PromptFormat.from_dict(m["prompt_format"]) for name, m in meta.items() if m.get("prompt_format")
        }
        self.reserved = set(placeholders)
        """Placeholder strings a client may not type into text."""

    def prompt_format(self, plugins: tuple[str, ...]) -> PromptFormat | None:
        """The format the media of ``plugins`` were trained on (None: no recorded format, the plain template).

        Raises:
            InvalidRequest: the plugins were trained on different formats (one prompt cannot honour both).
        """
        formats = {self.formats[name] for name in plugins if name in self.formats}
        if len(formats) > 1:
            raise InvalidRequest(
                f"the plugins {', '.join(plugins)} were trained on different prompt formats; send their media "
                "in separate requests",
                param="messages",
                code="incompatible_plugins",
            )
        return formats.pop() if formats else None

    def inputs(self, items: dict[str, list[Any]], device: torch.device) -> dict[str, torch.Tensor]:
        """Decoded media → each plugin's input batch on ``device``; a plugin is built (weights read) at first use.

        Raises:
            InvalidRequest: media the plugin cannot take (too short, wrong shape).
            PluginUnavailable: the plugin failed to load.
        """
        inputs = {}
        for name, batch in items.items():
            if not batch:
                continue
            with self.lock:  # building a plugin adds a submodule: not while a forward pass runs
                first = name not in self.model.plugins
                try:
                    plugin = self.model.plugin(name)
                except Exception as err:
                    log.exception("plugin %s failed to load", name)
                    raise PluginUnavailable(
                        f"the {name} plugin could not be loaded: {err}", code="plugin_unavailable"
                    ) from err
            if first:
                log.info("on demand: %s plugin loaded onto %s", name, self.loaded()[name])
            try:
                inputs[name] = plugin.preprocess(batch).to(device)
            except ValueError as err:
                raise InvalidRequest(str(err), param="messages", code="invalid_media") from err
        return inputs

    def loaded(self) -> dict[str, str | None]:
        """Plugin name → the device it sits on, or None while it is not built yet."""
        built = dict(self.model.plugins.items())
        return {name: str(next(built[name].parameters()).device) if name in built else None for name in self.meta}

    def describe(self, device: torch.device) -> list[str]:
        """One start-up line per plugin: what it is, which modality it serves, what it was trained on."""
        lines = []
        for name, meta in self.meta.items():
            modalities = [m for m, s in self.slots.items() if s.name == name]
            fmt = self.formats.get(name)
            trained = (
                f"trained on {'/'.join(fmt.orders)} chat prompts, thinking {'on' if fmt.enable_thinking else 'off'}"
                if fmt
                else "no recorded prompt format"
            )
            lines.append(
                f"{name} plugin ({meta.get('_target_', '?').rsplit('.', 1)[-1]}, {meta.get('num_tokens')} x "
                f"{meta.get('placeholder')}, serves {', '.join(modalities) or 'no'} content; {trained}): "
                f"on demand, loads onto {device} at first use"
            )
        return lines or ["plugins: none (text only)"]


def _check_attachable(meta: dict[str, dict[str, Any]], vocab: dict[str, int], hidden_size: int) -> None:
    for name, m in meta.items():
        if m.get("placeholder") not in vocab:
            raise ValueError(
                f"plugin {name}: placeholder {m.get('placeholder')!r} is not a token of the decoder's tokenizer"
            )
        if m.get("hidden_size") not in (None, hidden_size):
            raise ValueError(
                f"plugin {name}: projects to {m['hidden_size']}, the decoder's hidden size is {hidden_size}"
            )
