"""A plugin artifact pinned to its decoder: ``plugins/<name>/`` = weights + config + ``manifest.json``.

A plugin only means something next to the decoder it was trained against: the projector maps
into that decoder's embedding space and the placeholders are that tokenizer's ids. The manifest
records the decoder's fingerprint (sha256 of its config, tokenizer files and placeholder ids)
and the digest of its weight files, plus the sha256 of every file of the artifact. Loading
against another decoder raises :class:`PluginMismatchError` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoglm_train.model.plugin import ModalityPlugin
from autoglm_train.model.plugin_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PluginMismatchError,
    load_plugin,
    plugin_target,
    save_plugin,
)
from autoglm_train.model.prompt_format import PromptFormat

MANIFEST_FILE = "manifest.json"
FORMAT = "autoglm-train/plugin"
FORMAT_VERSION = 1
ARTIFACT_FILES = (CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE)
# Files that define how text becomes ids. The chat template is left out: it changes prompts, not ids.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Keys that describe where or with what a file was written, not the model: they must not change the pin.
# dtype too: a bf16 copy of the same decoder fits the plugin (its weights digest still tells them apart).
_VOLATILE_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "is_local", "local_files_only", "_commit_hash",
    "dtype", "torch_dtype",
}  # fmt: skip
_CANONICAL_FILES = {"config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}


@dataclass(frozen=True)
class DecoderPin:
    """What a plugin needs to stay valid: the decoder's config, tokenizer, placeholder ids and weights."""

    config_sha256: str
    tokenizer_sha256: str
    placeholder_ids: dict[str, int]
    weights_sha256: str | None = None
    """Digest of the decoder's weight files; ``None`` when they were not hashed."""
    path: str | None = None
    """Where the decoder was read from (informative only)."""

    @property
    def fingerprint(self) -> str:
        """sha256 of config + tokenizer + placeholder ids (the pin the issue asks for)."""
        blob = json.dumps([self.config_sha256, self.tokenizer_sha256, self.placeholder_ids], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def identity(self) -> str:
        """The fingerprint plus the weights digest: what a training checkpoint belongs to."""
        return hashlib.sha256(f"{self.fingerprint}:{self.weights_sha256}".encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderPin:
        fields = {k: data.get(k) for k in ("config_sha256", "tokenizer_sha256", "weights_sha256", "path")}
        return cls(placeholder_ids=dict(data["placeholder_ids"]), **fields)


def pin_decoder(directory: str | Path, placeholder_ids: dict[str, int], hash_weights: bool = True) -> DecoderPin:
    """Fingerprint an HF decoder directory (config.json, tokenizer files, weight files)."""
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory}: not a Hugging Face decoder directory (no config.json)")
    tokenizer = hashlib.sha256()
    found = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for name in found:
        tokenizer.update(name.encode() + b"\0" + _canonical_bytes(directory / name) + b"\0")
    return DecoderPin(
        config_sha256=config_sha256(directory),
        tokenizer_sha256=tokenizer.hexdigest(),
        placeholder_ids=dict(sorted(placeholder_ids.items())),
        weights_sha256=weights_sha256(directory) if hash_weights else None,
        path=str(directory),
    )


def config_sha256(directory: str | Path) -> str:
    """sha256 of a decoder's ``config.json``, keys sorted and volatile keys (versions, dtype, paths) dropped."""
    return hashlib.sha256(_canonical_bytes(Path(directory) / "config.json")).hexdigest()


def weights_sha256(directory: str | Path) -> str | None:
    """Digest of a decoder's weight files (name + sha256 of each); None when it has none."""
    files = sorted(Path(directory).glob("*.safetensors")) or sorted(Path(directory).glob("*.bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest() if files else None


def check_pin(trained_for: DecoderPin, current: DecoderPin, where: str, check_weights: bool = True) -> None:
    """Raise :class:`PluginMismatchError` naming every part of the decoder that differs."""
    diffs = []
    if trained_for.config_sha256 != current.config_sha256:
        diffs.append("config.json (architecture/shape)")
    if trained_for.tokenizer_sha256 != current.tokenizer_sha256:
        diffs.append("tokenizer files")
    if trained_for.placeholder_ids != current.placeholder_ids:
        changed = {
            tok: (trained_for.placeholder_ids.get(tok), current.placeholder_ids.get(tok))
            for tok in sorted({*trained_for.placeholder_ids, *current.placeholder_ids})
            if trained_for.placeholder_ids.get(tok) != current.placeholder_ids.get(tok)
        }
        diffs.append(f"placeholder token ids {changed} (trained, now)")
    if (
        check_weights
        and trained_for.weights_sha256
        and current.weights_sha256
        and trained_for.weights_sha256 != current.weights_sha256
    ):
        diffs.append("weights (same shape, different values: a retrained decoder)")
    if diffs:
        raise PluginMismatchError(
            f"{where}: trained against decoder {trained_for.path or '?'} (fingerprint {trained_for.fingerprint[:12]}), "
            f"but decoder {current.path or '?'} (fingerprint {current.fingerprint[:12]}) differs in: "
            f"{'; '.join(diffs)}. Retrain it: python train.py recipe=add_modality plugin=<name> decoder=<dir>"
        )


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
    check_pin(DecoderPin.from_dict(manifest["decoder"]), decoder, str(directory), check_weights)
    return load_plugin(directory, decoder.fingerprint)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _canonical_bytes(path: Path) -> bytes:
    """Config-like JSON re-serialised with sorted keys and volatile keys dropped; other files as they are.

    Only configs carry volatile keys; big files (``tokenizer.json``) are hashed as written.
    """
    if path.name not in _CANONICAL_FILES:
        return path.read_bytes()
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in _VOLATILE_KEYS}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("autoglm-train", "torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
