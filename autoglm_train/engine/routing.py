"""Which request content part feeds which plugin, from what each plugin declares (``modality``, ``placeholder``).

OpenAI names two media part types (``image_url``, ``input_audio``); a plugin of any other modality
``m`` is reached with ``{"type": "input_m", "input_m": {"data": ...}}``. Nothing here is hard-coded
per plugin: a modality added in one file + one yaml is servable as soon as its plugin is in a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# OpenAI's own part types for the modalities it names; every other modality m is "input_m".
OPENAI_PARTS = {"image": "image_url", "audio": "input_audio"}
# Plugins saved before plugin.json declared a modality: known by their placeholder.
_LEGACY_MODALITY = {"<|image|>": "image", "<|audio|>": "audio"}


def part_type(modality: str) -> str:
    """The content part type a client uses to send media of ``modality``."""
    return OPENAI_PARTS.get(modality, f"input_{modality}")


def plugin_modality(meta: dict[str, Any]) -> str:
    """A plugin's declared modality (``plugin.json``), or the one its placeholder implies for older plugins."""
    return meta.get("modality") or _LEGACY_MODALITY.get(meta.get("placeholder", ""), meta.get("name", "unknown"))


@dataclass(frozen=True)
class PluginSlot:
    """What the parser needs to know of a plugin without building it."""

    name: str
    placeholder: str
    num_tokens: int
    modality: str = ""


def plugin_slots(plugin_meta: dict[str, dict[str, Any]]) -> dict[str, PluginSlot]:
    """Content part type → the plugin it feeds, from each plugin's declared modality.

    Raises:
        ValueError: two plugins declare the same modality (a request part could not be routed).
    """
    slots: dict[str, PluginSlot] = {}
    for name, meta in plugin_meta.items():
        modality = plugin_modality(meta)
        kind = part_type(modality)
        if kind in slots:
            raise ValueError(f"plugins {slots[kind].name} and {name} both declare modality '{modality}'")
        slots[kind] = PluginSlot(name, meta["placeholder"], int(meta["num_tokens"]), modality)
    return slots
