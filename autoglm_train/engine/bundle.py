"""Find what a serving bundle holds, tolerantly: a full bundle, a bare decoder/ + plugins/, or a plain HF dir.

The engine needs four facts: where the HF decoder is, which plugin folders exist (read only
on first use), the model's name, and what the manifest says (logged, shown in /v1/models).
The export tool writes the full layout; a plain ``save_hf_decoder`` directory serves too.
The manifest itself is read by its one owner, :func:`autoglm_train.export.manifest.read_manifest`,
which refuses a file of another format or of a newer format version than this reader knows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_train.export.manifest import MANIFEST, check_files, read_manifest
from autoglm_train.model.plugin_io import CONFIG_FILE as PLUGIN_CONFIG
from autoglm_train.model.plugin_io import read_plugin_meta

log = logging.getLogger(__name__)

DECODER_DIR = "decoder"
PLUGINS_DIR = "plugins"


@dataclass(frozen=True)
class BundleInfo:
    """Where the parts of a bundle live on disk."""

    root: Path
    decoder_dir: Path
    plugin_dirs: dict[str, Path] = field(default_factory=dict)
    """Plugin name → its folder (``plugin.json`` + ``model.safetensors``)."""
    plugin_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Plugin name → its ``plugin.json`` (placeholder, num_tokens, ...), read without building it."""
    manifest: dict[str, Any] | None = None
    name: str = "model"


def read_bundle(path: str | Path) -> BundleInfo:
    """Locate the decoder and plugins of ``path``.

    Accepts (in this order): a directory with ``manifest.json`` (its ``forms.hf.path`` or
    ``decoder/`` is the decoder, its ``modules.plugins`` or ``plugins/*`` the plugins); a
    directory with ``decoder/`` but no manifest; a plain HF model directory (``config.json``).

    Raises:
        FileNotFoundError: naming what was looked for.
        BundleError: the manifest is not valid JSON, of another format, or of a newer format version.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"bundle {root}: no such directory")
    manifest = read_manifest(root) if (root / MANIFEST).is_file() else None
    decoder = _decoder_dir(root, manifest)
    plugin_dirs = _plugin_dirs(root, manifest)
    meta = {name: read_plugin_meta(d) for name, d in plugin_dirs.items()}
    name = (manifest or {}).get("model_name") or root.name
    return BundleInfo(
        root=root, decoder_dir=decoder, plugin_dirs=plugin_dirs, plugin_meta=meta, manifest=manifest, name=name
    )


def verify_bundle_files(info: BundleInfo) -> int:
    """Check every file against the manifest's sha256 (the export tool's checker); returns files checked."""
    if info.manifest is None:
        raise FileNotFoundError(f"bundle {info.root}: no {MANIFEST} to verify against")
    return check_files(info.root, info.manifest)


def _decoder_dir(root: Path, manifest: dict[str, Any] | None) -> Path:
    candidates = []
    hf_form = ((manifest or {}).get("forms") or {}).get("hf") or {}
    if isinstance(hf_form.get("path"), str):
        candidates.append(root / hf_form["path"])
    candidates += [root / DECODER_DIR, root]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"bundle {root}: no decoder found (looked for config.json in {', '.join(str(c) for c in candidates)}); "
        "pass a bundle written by tools/export or a Hugging Face model directory"
    )


def _plugin_dirs(root: Path, manifest: dict[str, Any] | None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    listed = ((manifest or {}).get("modules") or {}).get("plugins") or {}
    for name, entry in listed.items() if isinstance(listed, dict) else ():
        folder = root / (
            entry.get("path") if isinstance(entry, dict) and entry.get("path") else f"{PLUGINS_DIR}/{name}"
        )
        if not (folder / PLUGIN_CONFIG).is_file():
            raise FileNotFoundError(
                f"bundle {root}: manifest lists plugin '{name}' but {folder / PLUGIN_CONFIG} is missing"
            )
        found[name] = folder
    if (root / PLUGINS_DIR).is_dir():
        for folder in sorted((root / PLUGINS_DIR).iterdir()):
            if (folder / PLUGIN_CONFIG).is_file():
                name = read_plugin_meta(folder).get("name", folder.name)
                found.setdefault(name, folder)
    return found
