"""Which modality feeds which plugin, from what each plugin declares (``modality``, ``placeholder``).

Nothing here is hard-coded per plugin: a modality added in one file + one yaml is servable as soon as its
plugin is in a bundle. How a client names a modality on the wire (OpenAI's ``image_url``/``input_audio``
content parts) is the server's business (``autoglm_train.serve.multimodal``), not the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Plugins saved before plugin.json declared a modality: known by their placeholder.
_LEGACY_MODALITY = {"<|image|>": "image", "<|audio|>": "audio"}


def plugin_modality(meta: dict[str, Any]) -> str:
    """A plugin's declared modality (``plugin.json``), or the one its placeholder implies for older plugins."""
    return meta.get("modality") or _LEGACY_MODALITY.get(meta.get("placeholder", ""), meta.get("name", "unknown"))


@dataclass(frozen=True)
class PluginSlot:
    """What a request parser needs to know of a plugin without building it."""

    name: str
    placeholder: str
    num_tokens: int
    modality: str = ""


def plugin_slots(plugin_meta: dict[str, dict[str, Any]]) -> dict[str, PluginSlot]:
    """Modality → the plugin it feeds, from each plugin's declared modality (in the bundle's plugin order).

    Raises:
        ValueError: two plugins declare the same modality (a request's media could not be routed).
    """
    slots: dict[str, PluginSlot] = {}
    for name, meta in plugin_meta.items():
        modality = plugin_modality(meta)
        if modality in slots:
            raise ValueError(f"plugins {slots[modality].name} and {name} both declare modality '{modality}'")
        slots[modality] = PluginSlot(name, meta["placeholder"], int(meta["num_tokens"]), modality)
    return slots
