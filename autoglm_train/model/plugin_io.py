"""A plugin's own artifact: ``<dir>/plugin.json`` + ``model.safetensors``.

``plugin.json`` carries the ``_target_`` and constructor arguments, so a plugin rebuilds
from its folder alone, and the decoder fingerprint it was trained against.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from autoglm_train.model.pin import check_pin
from autoglm_train.model.plugin import ModalityPlugin

CONFIG_FILE = "plugin.json"
WEIGHTS_FILE = "model.safetensors"


def plugin_target(plugin: ModalityPlugin) -> str:
    """The ``_target_`` that rebuilds ``plugin``'s class from its ``config()``."""
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def save_plugin(
    plugin: ModalityPlugin,
    directory: str | Path,
    decoder_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the plugin atomically (temp dir + rename); never pickles."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)
    meta = plugin_meta(plugin, decoder_fingerprint, extra)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    state = {k: v.detach().contiguous().cpu() for k, v in plugin.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def plugin_meta(
    plugin: ModalityPlugin, decoder_fingerprint: str | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``plugin.json`` says of a plugin: how to rebuild it, its modality, and what it was trained for."""
    return {
        "_target_": plugin_target(plugin),
        **plugin.config(),
        "modality": plugin.modality or plugin.name,
        "decoder_fingerprint": decoder_fingerprint,
        **(extra or {}),
    }


def read_plugin_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a plugin folder (no {CONFIG_FILE})")
    return json.loads(path.read_text())


def load_plugin(directory: str | Path, decoder_fingerprint: str | None = None) -> ModalityPlugin:
    """Rebuild a plugin from its folder; refuse one trained for another decoder (``decoder_fingerprint`` given).

    Raises:
        PluginMismatchError: ``plugin.json`` records another decoder fingerprint.
    """
    from autoglm_train.model.registry import instantiate_plugin

    directory = Path(directory)
    meta = read_plugin_meta(directory)
    trained_for = meta.pop("decoder_fingerprint", None)
    if decoder_fingerprint:
        check_pin(trained_for, decoder_fingerprint, f"plugin {meta.get('name')} ({directory})")
    ctor_keys = {"_target_", *_constructor_keys(meta)}
    plugin = instantiate_plugin({k: v for k, v in meta.items() if k in ctor_keys})
    missing, unexpected = plugin.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE}: weights do not fit plugin '{plugin.name}' "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return plugin


def _constructor_keys(meta: dict[str, Any]) -> list[str]:
    import inspect

    from hydra.utils import get_class

    cls = get_class(meta["_target_"])
    return list(inspect.signature(cls.__init__).parameters)[1:]
