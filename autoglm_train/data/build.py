"""Build (or reuse) the packed train/val datasets for a ``TextDataSpec`` and a tokenizer.

Tokenizing a corpus is the slow part of a short run, so the packed blocks are saved with ``save_to_disk`` under
a directory keyed by a hash of everything that changes them (source content, tokenizer, seq_len, split), and
the next run with the same key only memory-maps them. Batch sizes and block caps are not in the key: they are
applied after loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoglm_train.data import text
from autoglm_train.data.corpora import BUILTIN_CORPORA, build_corpus, corpus_fingerprint
from autoglm_train.data.reader import ReadReport, ReadResult, list_files, looks_local, read_hub, read_local
from autoglm_train.data.spec import TextDataSpec

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Bump when split/tokenize/pack logic changes, so old caches are not reused.
PIPELINE_VERSION = 1
META_FILE = "meta.json"  # written last: its presence marks a complete cache entry


@dataclass
class PackedText:
    """Train/val blocks ready for the loaders, plus what was read and built."""

    train: datasets.Dataset
    val: datasets.Dataset
    report: ReadReport
    stats: dict[str, int] = field(default_factory=dict)
    """docs/tokens/blocks per split, before the ``max_*_blocks`` caps."""
    cache_path: Path | None = None
    from_cache: bool = False


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Name, size, EOS, a hash of the vocabulary and of the chat template: any change re-tokenizes."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "name": str(tokenizer.name_or_path),
        "size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "vocab": hashlib.sha256(vocab.encode()).hexdigest()[:16],
        "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16],
    }


def source_fingerprint(spec: TextDataSpec) -> dict[str, Any]:
    """Identify the source content: corpus version, local files' size+mtime, or Hub name+split."""
    if spec.source in BUILTIN_CORPORA:
        return {"builtin": corpus_fingerprint(spec.source)}
    if looks_local(spec.source):
        root = Path(spec.source).expanduser().resolve()
        files = [(str(p.relative_to(root) if p != root else p.name), *_stat(p)) for p in list_files(root)]
        return {"path": str(root), "files": files, "text_field": spec.text_field, "txt_mode": spec.txt_mode}
    return {"hub": spec.source, "split": spec.hub_split, "text_field": spec.text_field}


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def cache_key(spec: TextDataSpec, tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that changes the packed blocks."""
    parts = {
        "pipeline": PIPELINE_VERSION,
        "source": source_fingerprint(spec),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": spec.seq_len,
        "val_fraction": spec.val_fraction,
        "seed": spec.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(spec: TextDataSpec, tokenizer: PreTrainedTokenizerBase) -> Path:
    """``<cache_dir>/packed/<source-slug>-<key>``: readable, and unique per content."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.source.rstrip("/")).name or "data")[:40]
    return Path(spec.cache_dir) / "packed" / f"{slug}-{cache_key(spec, tokenizer)}"


def read_documents(spec: TextDataSpec) -> ReadResult:
    """Resolve ``spec.source`` (embedded corpus, local path or Hub) and read it."""
    if spec.source in BUILTIN_CORPORA:
        corpus = build_corpus(spec.source, Path(spec.cache_dir) / "corpora")
        return read_local(corpus, strict=spec.strict, label=spec.source)
    if looks_local(spec.source):
        return read_local(spec.source, text_field=spec.text_field, txt_mode=spec.txt_mode, strict=spec.strict)
    return read_hub(spec.source, split=spec.hub_split, text_field=spec.text_field, strict=spec.strict)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """datasets draws a bar per map/save; a build is summarized in one log line instead."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _build(spec: TextDataSpec, tokenizer: PreTrainedTokenizerBase, out: Path, key: str) -> None:
    """Read, split by document, tokenize, pack, and save into ``out`` (a fresh directory)."""
    result = read_documents(spec)
    train_docs, val_docs = text.split_documents(result.documents, spec.val_fraction, spec.seed)
    stats: dict[str, int] = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokenized = text.tokenize_texts(text.render_documents(docs, tokenizer), tokenizer, fingerprint=f"{key}-{split}")
        stream = text.token_stream(tokenized)
        blocks = text.pack_blocks(stream, spec.seq_len)
        if len(blocks):  # datasets cannot load back a saved zero-row dataset; _load_split recreates it
            blocks.save_to_disk(str(out / split))
        stats |= {f"{split}_docs": len(docs), f"{split}_tokens": len(stream), f"{split}_blocks": len(blocks)}
    report = result.report.to_dict()
    meta = {"key": key, "source": spec.source, "seq_len": spec.seq_len, "stats": stats, "report": report}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def build_packed(spec: TextDataSpec, tokenizer: PreTrainedTokenizerBase) -> PackedText:
    """Load the packed blocks for ``spec`` from the cache, building them first if this key was never built.

    The build goes to a temporary directory renamed into place, so a killed build is simply redone and two
    processes racing on the same key both end up reading one complete copy.
    """
    path = cache_path(spec, tokenizer)
    built = False
    if not (path / META_FILE).is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with _quiet_progress():
                _build(spec, tokenizer, tmp, path.name)
            if path.exists() and not (path / META_FILE).is_file():
                shutil.rmtree(path, ignore_errors=True)  # an incomplete entry left by a crash
            with contextlib.suppress(OSError):  # another process finished first: keep its copy
                os.replace(tmp, path)
            built = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((path / META_FILE).read_text())
    report = ReadReport.from_dict(meta["report"])
    if spec.strict and report.skipped:
        # The cache was built leniently; strict must still refuse the same bad rows.
        raise ValueError(f"{report.examples[0]} (data.strict=true; set it false to skip bad rows)")
    stats = meta["stats"]
    train = _cap(_load_split(path, "train", stats, spec.seq_len), spec.max_train_blocks)
    val = _cap(_load_split(path, "val", stats, spec.seq_len), spec.max_val_blocks)
    log.info(
        "data %s: %s %s — train %s docs / %s tokens / %s blocks, val %s docs / %s tokens / %s blocks (seq_len %d)",
        spec.source,
        "built" if built else "reused",
        path,
        *(f"{stats[f'{s}_{k}']:,}" for s in ("train", "val") for k in ("docs", "tokens", "blocks")),
        spec.seq_len,
    )
    return PackedText(train, val, report, stats, path, from_cache=not built)


def _load_split(path: Path, split: str, stats: dict[str, int], seq_len: int) -> datasets.Dataset:
    import datasets

    if stats[f"{split}_blocks"] == 0:
        return text.pack_blocks(np.zeros(0, dtype=text.TOKEN_DTYPE), seq_len)
    return datasets.load_from_disk(str(path / split))


def _cap(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None or len(dataset) <= limit else dataset.select(range(limit))
