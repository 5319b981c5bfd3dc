"""Local ``.jsonl`` / ``.csv`` pair tables read row by row: one broken line costs that line, not the run.

``datasets.load_dataset("json" | "csv")`` fails the whole table on one malformed line, one non-UTF-8 byte, or one cell
whose type differs from the rest of its column. Here such a line becomes a row that only says what is wrong with it
(:data:`BROKEN`), so the caller skips and counts it in file order (``strict`` stops at the first bad line, whatever
its kind), and cells keep their Python types, so a wrong type is caught per row like any other bad cell.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROW_SUFFIXES = (".jsonl", ".csv")
WHERE = "__where__"
"""Key added to every row: the ``file:line`` it came from, for skip reports."""
BROKEN = "__broken__"
"""Key of a row standing for an unreadable line: the skip reason."""

_Parsed = tuple[str, dict[str, Any] | None, str | None]  # (where, row, skip reason)


def read_rows(files: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``files`` in order (each with :data:`WHERE`; broken lines with :data:`BROKEN`), and their columns."""
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    for path in files:
        parse = _jsonl if path.suffix == ".jsonl" else _csv
        for where, row, problem in parse(path):
            if row is None:
                rows.append({WHERE: where, BROKEN: problem})
                continue
            columns.update(dict.fromkeys(row))
            rows.append({**row, WHERE: where})
    return rows, list(columns)


def _jsonl(path: Path) -> Iterator[_Parsed]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are layout
            where = f"{path}:{number}"
            try:
                row = json.loads(raw.rstrip(b"\r\n").decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError:
                yield where, None, "not utf-8"
                continue
            except json.JSONDecodeError as err:
                yield f"{where}: {err.msg}", None, "bad json"
                continue
            if isinstance(row, dict):
                yield where, row, None
            else:
                yield where, None, "row is not an object"


def _csv(path: Path) -> Iterator[_Parsed]:
    # surrogateescape keeps undecodable bytes visible per cell, so only their record is dropped
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # e.g. a NUL byte: that record only
            yield f"{path}:{reader.line_num}: {err}", None, "bad csv row"
            continue
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in record):
            continue
        if any(_undecodable(cell) for cell in record):
            yield where, None, "not utf-8"
        elif len(record) != len(header):
            yield f"{where}: {len(record)} fields, the header has {len(header)}", None, "bad csv row"
        else:
            yield where, dict(zip(header, record, strict=True)), None


def _undecodable(cell: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in cell)
