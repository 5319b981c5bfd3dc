"""Read user text (files, directories, Hub datasets) into documents, skipping and counting bad rows.

Real corpora have broken lines; one bad row should cost one row, not the run. Every skipped row is counted
by kind with its first locations (``file:line``) kept, so the run summary says exactly what was dropped.
``strict=True`` turns the first bad row into an error instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from autoglm_train.errors import ConfigValueError

log = logging.getLogger(__name__)

BAD_JSON = "bad_json"
NOT_UTF8 = "not_utf8"
MISSING_FIELD = "missing_field"
EMPTY_TEXT = "empty_text"
WRONG_TYPE = "wrong_type"
SKIP_KINDS = (BAD_JSON, NOT_UTF8, MISSING_FIELD, EMPTY_TEXT, WRONG_TYPE)

TXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TXT_MODES = ("file", "blocks")

# A document is {"text": str} or a chat row {"messages": [{"role": str, "content": str}, ...]}.
Document = dict[str, Any]


@dataclass
class ReadReport:
    """What a read kept and skipped; saved with the dataset cache so a cached run still reports it."""

    source: str
    files: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped-row count per kind (one of ``SKIP_KINDS``)."""
    examples: list[str] = field(default_factory=list)
    """First few skipped rows per kind, as ``file:line: kind: detail``."""
    examples_per_kind: int = 3

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One log line: kept documents, skipped rows per kind and the first skipped location."""
        line = f"data {self.source}: {self.documents:,} documents from {self.files:,} file(s)"
        if not self.skipped:
            return line + ", no bad rows"
        kinds = ", ".join(f"{kind}={n:,}" for kind, n in sorted(self.skipped.items()))
        return f"{line}; skipped {self.total_skipped:,} bad rows ({kinds}); first: {self.examples[0]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadReport:
        return cls(**data)


@dataclass
class ReadResult:
    """Documents in source order plus the report of what was skipped."""

    documents: list[Document]
    report: ReadReport


class DataError(ConfigValueError):
    """The data cannot be used as configured: a bad row under ``data.strict=true``, or no usable row at all."""


class _BadRow(Exception):
    def __init__(self, kind: str, detail: str, line: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.line = line  # exact line inside a multi-line row (a text file or block), when known


def _check_messages(messages: object) -> Document:
    if not isinstance(messages, list) or not messages:
        raise _BadRow(WRONG_TYPE, f"'messages' must be a non-empty list, got {type(messages).__name__}")
    for turn in messages:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise _BadRow(WRONG_TYPE, "each message must be {'role': str, 'content': str}")
    if not any(turn["content"].strip() for turn in messages):
        raise _BadRow(EMPTY_TEXT, "all message contents are empty")
    return {"messages": [{"role": t["role"], "content": t["content"]} for t in messages]}


def check_row(row: object, text_field: str = "text") -> Document:
    """Validate one parsed row into a document; raises ``_BadRow`` with a kind from ``SKIP_KINDS``."""
    if not isinstance(row, dict):
        raise _BadRow(WRONG_TYPE, f"row must be an object, got {type(row).__name__}")
    if row.get(text_field) is None:
        if row.get("messages") is not None:
            return _check_messages(row["messages"])
        raise _BadRow(MISSING_FIELD, f"no {text_field!r} (or 'messages') value")
    text = row[text_field]
    if not isinstance(text, str):
        raise _BadRow(WRONG_TYPE, f"{text_field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise _BadRow(EMPTY_TEXT, f"{text_field!r} is empty")
    return {"text": text}


class _Collector:
    """Accumulates documents and bad-row counts for one read."""

    def __init__(self, source: str, strict: bool) -> None:
        self.report = ReadReport(source=source)
        self.documents: list[Document] = []
        self.strict = strict

    def add(self, doc: Document) -> None:
        self.documents.append(doc)
        self.report.documents += 1

    def skip(self, where: str, bad: _BadRow) -> None:
        if self.strict:
            raise DataError(f"{where}: {bad.kind}: {bad.detail} (data.strict=true; set it false to skip bad rows)")
        seen = self.report.skipped.get(bad.kind, 0)
        self.report.skipped[bad.kind] = seen + 1
        if seen < self.report.examples_per_kind:
            self.report.examples.append(f"{where}: {bad.kind}: {bad.detail}")

    def row(self, row: object, where: str, text_field: str) -> None:
        try:
            self.add(check_row(row, text_field))
        except _BadRow as bad:
            self.skip(where, bad)


def _decode(raw: bytes, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise _BadRow(NOT_UTF8, f"invalid UTF-8 byte {raw[e.start : e.start + 1]!r}", line) from None


def _text_doc(raw: bytes, path: Path, line: int, out: _Collector) -> None:
    try:
        text = _decode(raw, line).lstrip("\ufeff").replace("\r\n", "\n")
        if not text.strip():
            raise _BadRow(EMPTY_TEXT, "no text")
        out.add({"text": text.strip("\n")})
    except _BadRow as bad:
        out.skip(f"{path}:{bad.line or line}", bad)


def _read_txt(path: Path, mode: str, out: _Collector) -> None:
    raw = path.read_bytes()
    if mode == "file":
        _text_doc(raw, path, 1, out)
        return
    block: list[bytes] = []
    start = 1
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            _text_doc(b"".join(block), path, start, out)
            block = []
    if block:
        _text_doc(b"".join(block), path, start, out)


def _read_jsonl(path: Path, text_field: str, out: _Collector) -> None:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue  # blank lines (a trailing newline) are layout, not rows
            try:
                row = json.loads(_decode(raw.rstrip(b"\r\n"), number).lstrip("\ufeff"))  # a BOM may open the file
            except _BadRow as bad:
                out.skip(where, bad)
                continue
            except json.JSONDecodeError as e:
                out.skip(where, _BadRow(BAD_JSON, e.msg))
                continue
            out.row(row, where, text_field)


def _read_parquet(path: Path, text_field: str, out: _Collector) -> None:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # a broken footer loses every row: that is a file error, not a bad row
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    number = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            number += 1
            out.row(row, f"{path}:{number}", text_field)


def list_files(root: Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES, key: str = "data.source") -> list[Path]:
    """``root`` itself, or the files under it with one of ``suffixes`` (sorted, hidden ones skipped)."""
    if root.is_file():
        if root.suffix.lower() not in suffixes:
            raise ValueError(f"{key}={str(root)!r}: unsupported file type; use one of {suffixes}")
        return [root]
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )
    if not files:
        raise FileNotFoundError(f"{key}={str(root)!r} holds no {'/'.join(suffixes)} files")
    return files


def read_files(files: list[Path], out: _Collector, readers: dict[str, Callable[[Path], None]]) -> None:
    """Each file through the reader registered for its suffix (the text and chat readers share this); counts them."""
    for path in files:
        out.report.files += 1
        readers[path.suffix.lower()](path)


def looks_local(source: str) -> bool:
    """Whether ``source`` names a local path (existing, or path-shaped) rather than a Hub dataset."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith(("/", ".", "~")) or path.suffix.lower() in SUPPORTED_SUFFIXES


def read_local(
    source: str | Path, *, text_field: str = "text", txt_mode: str = "file", strict: bool = False, label: str = ""
) -> ReadResult:
    """Read a file or a directory tree of ``.txt`` / ``.jsonl`` / ``.parquet`` files (sorted, hidden files skipped).

    ``txt_mode="file"`` makes each ``.txt`` file one document; ``"blocks"`` makes each blank-line-separated block one.
    """
    if txt_mode not in TXT_MODES:
        raise ValueError(f"data.txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.source={str(source)!r} does not exist")
    out = _Collector(label or str(source), strict)
    readers = dict.fromkeys(TXT_SUFFIXES, partial(_read_txt, mode=txt_mode, out=out))
    readers.update(dict.fromkeys(JSONL_SUFFIXES, partial(_read_jsonl, text_field=text_field, out=out)))
    readers.update(dict.fromkeys(PARQUET_SUFFIXES, partial(_read_parquet, text_field=text_field, out=out)))
    read_files(list_files(root), out, readers)
    return _finish(out)


def read_hub(name: str, *, split: str = "train", text_field: str = "text", strict: bool = False) -> ReadResult:
    """Load a Hugging Face Hub dataset split and validate its rows like a local JSONL file."""
    hint = ". Use 'shakespeare', 'kjv', an existing path, or check the dataset name and network access."
    return read_hub_rows(name, split, text_field, _Collector(f"{name}[{split}]", strict), hint=hint)


def read_hub_rows(
    name: str, split: str, field: str, out: _Collector, key: str = "data.source", hint: str = ""
) -> ReadResult:
    """Every row of a Hub dataset split through ``out`` (the text and chat readers share this); ``key`` and
    ``hint`` word the error when the split cannot be loaded."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing split: all end the same way for the user
        raise ConnectionError(
            f"{key}={name!r} is not a local file or directory, so it was looked up on the Hugging Face Hub "
            f"(split={split!r}) and could not be loaded: {e}{hint}"
        ) from e
    out.report.files = 1
    for number, row in enumerate(dataset, 1):
        out.row(row, f"{name}[{split}]:{number}", field)
    return _finish(out)


def read_source(
    source: str, *, text_field: str = "text", txt_mode: str = "file", hub_split: str = "train", strict: bool = False
) -> ReadResult:
    """Read a local path if ``source`` looks like one, else a Hub dataset."""
    if looks_local(source):
        return read_local(source, text_field=text_field, txt_mode=txt_mode, strict=strict)
    return read_hub(source, split=hub_split, text_field=text_field, strict=strict)


def _finish(out: _Collector) -> ReadResult:
    report = out.report
    (log.warning if report.skipped else log.info)(report.summary())
    if not out.documents:
        raise DataError(f"data.source={report.source!r}: no usable documents ({report.summary()})")
    return ReadResult(out.documents, report)
