"""The bundle's ``manifest.json``: what is inside, in which precision, and the sha256 of every file.

The checksums make a bundle self-verifying: :func:`check_files` names every file that is
missing, unexpected, or whose bytes no longer match what the export wrote.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "autoglm-bundle"
FORMAT_VERSION = 1

# Distributions whose versions decide how a bundle's files were produced and are read back.
VERSIONED = (
    "autoglm-train",
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "gguf",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "llama_cpp_python",
)


class BundleError(ValueError):
    """A bundle cannot be written or read as asked."""


class BundleIntegrityError(BundleError):
    """Bundle files differ from the manifest: each problem names the file."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root = root
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"bundle {root} failed its checksum check ({len(problems)} problem(s)):\n{lines}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every regular file under ``root`` except the bundle's own manifest, as sorted POSIX relative paths."""
    files = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in files if rel != MANIFEST)


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` for every bundle file."""
    return {
        rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size} for rel in bundle_files(root)
    }


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that write and read bundle files (absent ones omitted)."""
    versions = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` into ``manifest["files"]`` and write ``manifest.json``."""
    manifest = {**manifest, "files": file_table(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The parsed manifest of bundle ``root``; a clear error when it is absent or not a bundle manifest."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing; {root} is not a serving bundle (export one with tools/export/export.py)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleIntegrityError(Path(root), [f"{MANIFEST}: not valid JSON ({err})"]) from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {manifest['format_version']} is newer than this reader ({FORMAT_VERSION}); "
            "upgrade autoglm-train"
        )
    return manifest


def check_files(root: str | Path, manifest: dict[str, Any] | None = None) -> int:
    """Compare every file with the manifest; raise :class:`BundleIntegrityError` naming each bad one.

    Returns the number of files checked.
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    expected: dict[str, dict[str, Any]] = manifest.get("files", {})
    problems = []
    for rel, entry in expected.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing (listed in {MANIFEST})")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {entry['bytes']} (file edited or truncated)")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(
                f"{rel}: sha256 {actual[:16]}… does not match the manifest's {entry['sha256'][:16]}… "
                "(file edited or corrupted)"
            )
    problems += [
        f"{rel}: not listed in {MANIFEST} (unexpected file)" for rel in bundle_files(root) if rel not in expected
    ]
    if problems:
        raise BundleIntegrityError(root, problems)
    return len(expected)
