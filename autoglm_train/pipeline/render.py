"""A report as a list of blocks, rendered to Markdown (report.md) and to a standalone HTML page (report.html).

Table cells keep the value they show and the file#key it came from, so ``report.json`` can prove
every number is the run's own.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cell:
    """A shown text, and for numbers the exact value and where it was read."""

    text: str
    value: Any = None
    source: str | None = None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    name: str = ""
    """Key of the table in report.json."""
    note: str = ""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Figure:
    file: str
    caption: str


@dataclass
class Code:
    text: str


@dataclass
class Document:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(blocks)

    def tables(self) -> dict[str, Any]:
        """Every named table's cells with their values and sources (report.json)."""
        out = {}
        for t in self.blocks:
            if isinstance(t, Table) and t.name:
                out[t.name] = {
                    "columns": t.columns,
                    "rows": [[{"text": c.text, "value": c.value, "source": c.source} for c in row] for row in t.rows],
                }
        return out


# --- cell formatting (one place, so a test can re-format a source value and find it in the report) ---
def fmt(value: Any) -> str:
    """Numbers to 4 significant digits, integers with separators, booleans as yes/no."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_mb(value: Any) -> str:
    return "–" if value is None else f"{value / 1e6:.2f} MB"


def cell(data: dict[str, Any] | None, key: str, source: str, form: Callable[[Any], str] = fmt) -> Cell:
    """``data[key]`` as a cell remembering ``source#key``; a dotted key walks nested dicts."""
    value: Any = data
    for part in key.split(".") if "." in key and key not in (data or {}) else [key]:
        value = value.get(part) if isinstance(value, dict) else None
    return Cell(form(value), value, f"{source}#{key}")


def text(value: str) -> Cell:
    return Cell(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            lines += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Figure):
            lines += [f"![{b.caption}]({b.file})", "", f"_{b.caption}_", ""]
        elif isinstance(b, Code):
            lines += ["```", b.text, "```", ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(b.columns) + " |")
            lines.append("|" + "|".join("---" for _ in b.columns) + "|")
            lines += ["| " + " | ".join(_md_cell(c.text) for c in row) + " |" for row in b.rows]
            lines += ["", *([b.note, ""] if b.note else [])]
    return "\n".join(lines).rstrip() + "\n"


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>")]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"
    "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.note{color:#555;font-size:90%}"
)


def to_html(doc: Document) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(doc.title)}</title><style>{_CSS}</style>"]
    parts.append(f"<h1>{html.escape(doc.title)}</h1>")
    for b in doc.blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Figure):
            alt = html.escape(b.caption)
            parts.append(
                f"<figure><img src='{html.escape(b.file)}' alt='{alt}'><figcaption>{alt}</figcaption></figure>"
            )
        elif isinstance(b, Code):
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in b.columns)
            body = "".join(
                "<tr>"
                + "".join(
                    f"<td{' class=n' if isinstance(c.value, (int, float)) else ''}>{_inline(c.text)}</td>" for c in row
                )
                + "</tr>"
                for row in b.rows
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            if b.note:
                parts.append(f"<p class=note>{_inline(b.note)}</p>")
    return "\n".join(parts) + "\n"
