"""The decoder pin: what a plugin needs of its decoder, and the one check of it (training, export, serving).

A plugin only means something next to the decoder it was trained against: the projector maps into that
decoder's embedding space and the placeholders are that tokenizer's ids. A :class:`DecoderPin` records the
sha256 of the decoder's config, of its tokenizer files and of its placeholder ids (together: the
*fingerprint*, which ``plugin.json`` carries) and the digest of its weight files (the full pin, which a plugin
artifact's ``manifest.json`` and a bundle's manifest carry). :func:`check_pin` is the only comparison of two
pins: plugin loading, ``recipe=add_modality``, the export and the serving engine all call it, so a mismatch
reads the same wherever it is caught.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoglm_train.errors import ConfigValueError

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
RETRAIN = "Retrain it: python train.py recipe=add_modality plugin=<name> decoder=<dir>"


class PluginMismatchError(ConfigValueError):
    """A plugin trained against a different decoder."""


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
    """Fingerprint an HF decoder directory (config.json, tokenizer files, and with ``hash_weights`` its weight files).

    Hashing the weights reads every weight file once (sha256 at ~1.35 GB/s on one core here: see
    :func:`autoglm_train.engine.loading.check_plugin_pins` for what it costs a server at start-up).
    """
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


def check_pin(
    trained_for: DecoderPin | str | None, current: DecoderPin | str, where: str, check_weights: bool = True
) -> None:
    """Raise :class:`PluginMismatchError` naming every part of the decoder that differs from what was pinned.

    Args:
        trained_for: the full pin (a plugin artifact's or a bundle's manifest), only its fingerprint
            (``plugin.json``), or None (nothing recorded: nothing to check).
        current: the decoder at hand, as a pin or a fingerprint.
        where: what is checked, e.g. ``plugin vision (bundle/plugins/vision)``; the message starts with it.
        check_weights: compare the weights digests too, where both pins have one.
    """
    if not trained_for:
        return
    diffs = _differences(trained_for, current, check_weights)
    if diffs:
        raise PluginMismatchError(
            f"{where}: trained against decoder {_describe(trained_for)}, but decoder {_describe(current)} differs "
            f"in: {'; '.join(diffs)}. {RETRAIN}"
        )


def _differences(trained_for: DecoderPin | str, current: DecoderPin | str, check_weights: bool) -> list[str]:
    if isinstance(trained_for, str) or isinstance(current, str):
        if _fingerprint(trained_for) == _fingerprint(current):
            return []
        return ["config.json, tokenizer files or placeholder token ids (only the fingerprint was recorded)"]
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
    weights = (trained_for.weights_sha256, current.weights_sha256)
    if check_weights and all(weights) and weights[0] != weights[1]:
        diffs.append("weights (same shape, different values: a retrained or re-saved decoder)")
    return diffs


def _fingerprint(pin: DecoderPin | str) -> str:
    return pin if isinstance(pin, str) else pin.fingerprint


def _describe(pin: DecoderPin | str) -> str:
    return f"fingerprint {pin}" if isinstance(pin, str) else f"{pin.path or '?'} (fingerprint {pin.fingerprint})"


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
