"""Shared checks of the pipeline tests: every report number equals the value in the file it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoglm_train.pipeline.report import fmt, fmt_mb


def source_value(root: Path, source: str) -> Any:
    """The value ``file#key`` names (a dotted key walks nested dicts unless the file has the key as is)."""
    file, _, key = source.partition("#")
    data = json.loads((root / file).read_text())
    if key in data:
        return data[key]
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_report_cells(root: Path) -> int:
    """Assert each JSON-sourced cell of report.json holds its source's value, shown as report.md shows it.

    Returns how many cells were checked.
    """
    tables = json.loads((root / "report" / "report.json").read_text())["tables"]
    markdown = (root / "report" / "report.md").read_text()
    checked = 0
    for name, table in tables.items():
        for row in table["rows"]:
            for cell in row:
                source = cell["source"]
                if not source or ".json#" not in source:
                    continue
                expected = source_value(root, source)
                assert cell["value"] == expected, f"{name}: {source} is {expected!r}, report holds {cell['value']!r}"
                shown = (fmt(expected), "PASS" if expected is True else None)
                if isinstance(expected, (int, float)) and not isinstance(expected, bool):
                    shown += (fmt_mb(expected),)
                assert cell["text"] in shown, f"{name}: {source} shown as {cell['text']!r}"
                assert f"| {cell['text']} |" in markdown or f"| {cell['text']}\n" in markdown, cell["text"]
                checked += 1
    return checked
