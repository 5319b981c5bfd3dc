"""Where the offline chat prompts come from: hand-written files, templates over word lists, Shakespeare lines.

The default demo must distil an assistant with no hub, so its prompts ship with the package
(``autoglm_train/data/assets/``, see its README for sources and licences). A small model answers everyday
questions, so the prompts are everyday questions; templates widen the hand-written set with facts a 135M
teacher knows (capitals, authors, word meanings) and with lines of the embedded Shakespeare corpus, which
also keeps the student's text domain in its chat data.

A held-out prompt must not leak into training, not even in other words: a template slot (a country, a title,
a word) that any held-out prompt names is left out of the templates, and :func:`normalise`-equal prompts are
dropped by the caller (:mod:`autoglm_train.data.assistant_prompts`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from autoglm_train.data.corpora import _package_dir, strip_gutenberg

ASSETS = Path(__file__).parent / "assets"

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful, friendly assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are a concise and helpful assistant.",
    "You are a friendly assistant who answers clearly.",
    "You are a knowledgeable assistant. Keep your answers short.",
    "You are a polite assistant that gives short, accurate answers.",
    "You are an assistant. Be helpful and clear.",
)
"""Short system turns, so the student sees the system role before a user asks."""

_LINE_TEMPLATES = (
    'Explain this line from {title}: "{line}"',
    'What does this line from {title} mean? "{line}"',
    'Put this line from {title} into modern English: "{line}"',
)
_MIN_LINE, _MAX_LINE = 30, 80


def normalise(text: str) -> str:
    """The comparison form of a prompt: lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


def read_lines(name: str) -> list[str]:
    """The non-empty, non-comment lines of ``assets/<name>``."""
    path = ASSETS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall autoglm-train (its package data holds the prompts)")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_table(name: str) -> list[tuple[str, str]]:
    """Two tab-separated columns per line of ``assets/<name>``; a bad line is an error naming file and line."""
    rows: list[tuple[str, str]] = []
    for number, line in enumerate((ASSETS / name).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) != 2 or not all(cells):
            raise ValueError(f"{ASSETS / name}:{number}: expected two tab-separated columns, got {line!r}")
        rows.append((cells[0], cells[1]))
    return rows


def heldout_chat() -> list[str]:
    """The hand-written held-out chat prompts, in file order."""
    return read_lines("chat_heldout.txt")


def handwritten_chat() -> list[str]:
    """The hand-written training chat prompts, in file order."""
    return read_lines("chat_train.txt")


def _named_in(value: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(value.lower())}\b", text) is not None


def _slot_prompts(
    values: Iterable[str], phrasings: tuple[str, ...], rng: random.Random, heldout_text: str
) -> Iterator[str]:
    """One prompt per value (wording drawn from ``phrasings``), skipping values a held-out prompt names."""
    for value in values:
        phrasing = rng.choice(phrasings)  # drawn before the skip, so one held-out edit moves no other prompt
        if not _named_in(value, heldout_text):
            yield phrasing.format(x=value)


def template_prompts(rng: random.Random) -> list[str]:
    """Fact and explanation prompts over the word lists of ``assets/``, deterministic for a seeded ``rng``."""
    heldout_text = normalise("\n".join(heldout_chat()))
    countries = [country for country, _ in read_table("capitals.tsv")]
    titles = [title for title, _ in read_table("works.tsv")] + [t for _, t in read_table("shakespeare_plays.tsv")]
    words, animals, topics = read_lines("words.txt"), read_lines("animals.txt"), read_lines("topics.txt")
    groups: list[tuple[list[str], tuple[str, ...]]] = [
        (countries, ("What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}.")),
        (titles, ("Who wrote {x}?", "Who is the author of {x}?", "Who wrote the book {x}?")),
        (words, ('What does the word "{x}" mean?', "What does {x} mean?", "Define the word {x}.")),
        (words, ('Use the word "{x}" in a sentence.', "Give me a sentence with the word {x}.")),
        (words, ('Give me a synonym for "{x}".', "What is another word for {x}?")),
        (animals, ("Tell me a fact about {x}.", "Tell me something interesting about {x}.")),
        (animals, ("Where do {x} live?", "What do {x} eat?")),
        (topics, ("Explain {x} in simple terms.", "What is {x}? Explain briefly.", "Explain {x} to a child.")),
    ]
    out: list[str] = []
    for values, phrasings in groups:
        out.extend(_slot_prompts(values, phrasings, rng, heldout_text))
    return out


def _play_lines(path: Path) -> list[str]:
    """Whole-sentence spoken lines of one play: short enough to explain, not names or stage directions."""
    text = strip_gutenberg(path.read_text(encoding="utf-8"))
    keep: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not _MIN_LINE <= len(line) <= _MAX_LINE or not line[0].isupper() or line.isupper():
            continue
        if line[-1] not in ".!?" or any(mark in line for mark in ("[", "]", "--", "_", '"')):
            continue
        keep.append(line)
    return keep


def shakespeare_lines() -> list[tuple[str, str]]:
    """``(play title, line)`` for every usable line of the plays in the ``shakespeare`` package, in file order."""
    texts = _package_dir("shakespeare") / "texts"
    out: list[tuple[str, str]] = []
    for stem, title in read_table("shakespeare_plays.tsv"):
        path = texts / f"{stem}_gut.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (named in {ASSETS / 'shakespeare_plays.tsv'})")
        out.extend((title, line) for line in dict.fromkeys(_play_lines(path)))
    return out


def line_prompts(rng: random.Random, count: int) -> list[str]:
    """``count`` "explain this line" prompts over distinct Shakespeare lines, drawn with ``rng``."""
    lines = shakespeare_lines()
    if count > len(lines):
        raise ValueError(f"asked for {count} Shakespeare line prompts; the corpus has {len(lines)} usable lines")
    return [rng.choice(_LINE_TEMPLATES).format(title=title, line=line) for title, line in rng.sample(lines, count)]
