"""A plugin artifact pinned to its decoder: ``plugins/<name>/`` = weights + config + ``manifest.json``.

A plugin only means something next to the decoder it was trained against. The manifest records the
decoder's full pin (:class:`~autoglm_train.model.pin.DecoderPin`: fingerprint of config, tokenizer files
and placeholder ids, and the digest of its weight files), plus the sha256 of every file of the artifact.
Loading against another decoder raises :class:`~autoglm_train.model.pin.PluginMismatchError` naming what
differs (:func:`~autoglm_train.model.pin.check_pin`, the one pin check).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from autoglm_train.model.pin import DecoderPin, check_pin, file_sha256
from autoglm_train.model.plugin import ModalityPlugin
from autoglm_train.model.plugin_io import CONFIG_FILE, WEIGHTS_FILE, load_plugin, plugin_target, save_plugin
from autoglm_train.model.prompt_format import PromptFormat

MANIFEST_FILE = "manifest.json"
FORMAT = "autoglm-train/plugin"
FORMAT_VERSION = 1
ARTIFACT_FILES = (CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE)


def save_plugin_artifact(
    plugin: ModalityPlugin,
    directory: str | Path,
    pin: DecoderPin,
    extra: dict[str, Any] | None = None,
    prompt_format: PromptFormat | None = None,
) -> Path:
    """Write ``plugin.json`` + ``model.safetensors`` + ``manifest.json`` into ``directory``, atomically.

    ``prompt_format`` (how training rendered every example) goes into ``plugin.json``: the server renders
    requests carrying this plugin's media with it.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        recorded = {"prompt_format": prompt_format.to_dict()} if prompt_format is not None else None
        inner = save_plugin(plugin, staging / plugin.name, decoder_fingerprint=pin.fingerprint, extra=recorded)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "plugin": plugin.name,
            "target": plugin_target(plugin),
            "decoder": pin.to_dict(),
            "files": {
                name: {"sha256": file_sha256(inner / name), "bytes": (inner / name).stat().st_size}
                for name in (CONFIG_FILE, WEIGHTS_FILE)
            },
            "versions": _versions(),
            **(extra or {}),
        }
        (inner / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(inner, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; not a plugin artifact written by recipe=add_modality")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def artifact_pin(directory: str | Path) -> DecoderPin | None:
    """The full decoder pin a plugin folder's ``manifest.json`` records; None for a folder without one."""
    if not (Path(directory) / MANIFEST_FILE).is_file():
        return None
    return DecoderPin.from_dict(read_manifest(directory)["decoder"])


def load_plugin_artifact(directory: str | Path, decoder: DecoderPin, check_weights: bool = True) -> ModalityPlugin:
    """Rebuild a plugin from its artifact after checking file integrity and the decoder pin.

    Raises:
        PluginMismatchError: the artifact was trained against a different decoder.
        ValueError: a file of the artifact was changed or truncated since it was written.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, expected in manifest["files"].items():
        if file_sha256(directory / name) != expected["sha256"]:
            raise ValueError(f"{directory / name}: sha256 differs from {MANIFEST_FILE}; the artifact was modified")
    where = f"plugin {manifest.get('plugin', directory.name)} ({directory})"
    check_pin(DecoderPin.from_dict(manifest["decoder"]), decoder, where, check_weights)
    return load_plugin(directory, decoder.fingerprint)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("autoglm-train", "torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
