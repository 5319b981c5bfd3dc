"""Find what a serving bundle holds, tolerantly: a full bundle, a bare decoder/ + plugins/, or a plain HF dir.

The server needs four facts: where the HF decoder is, which plugin folders exist (read only
on first use), the model's name, and what the manifest says (logged, shown in /v1/models).
The export tool writes the full layout; a plain ``save_hf_decoder`` directory serves too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DECODER_DIR = "decoder"
PLUGINS_DIR = "plugins"
PLUGIN_CONFIG = "plugin.json"


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
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"bundle {root}: no such directory")
    manifest = _load_manifest(root)
    decoder = _decoder_dir(root, manifest)
    plugin_dirs = _plugin_dirs(root, manifest)
    meta = {name: json.loads((d / PLUGIN_CONFIG).read_text()) for name, d in plugin_dirs.items()}
    name = (manifest or {}).get("model_name") or root.name
    return BundleInfo(
        root=root, decoder_dir=decoder, plugin_dirs=plugin_dirs, plugin_meta=meta, manifest=manifest, name=name
    )


def verify_bundle_files(info: BundleInfo) -> int:
    """Check every file against the manifest's sha256 (the export tool's checker); returns files checked."""
    if info.manifest is None:
        raise FileNotFoundError(f"bundle {info.root}: no {MANIFEST} to verify against")
    from autoglm_train.export.manifest import check_files

    return check_files(info.root, info.manifest)


def _load_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return manifest


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
                name = json.loads((folder / PLUGIN_CONFIG).read_text()).get("name", folder.name)
                found.setdefault(name, folder)
    return found
