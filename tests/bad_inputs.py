"""Builders of broken inputs for the reliability tests: ~5% bad rows of every kind, in real files.

Text: a JSONL corpus of real Shakespeare rows with bad JSON, non-UTF-8 bytes, empty texts, missing fields, wrong
types, and a few over-long rows (more tokens than the teacher's context). Images: a JSONL pair table with corrupt,
zero-length, truncated and missing image files, empty texts, a broken JSON line and a non-UTF-8 line. Audio: a CSV
table with garbage, zero-length and empty WAVs, other sample rates (8 and 44.1 kHz: resampled, not dropped), a row
with the wrong number of fields and a non-UTF-8 line.
"""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np

TEXT_BAD_ROWS = {
    "bad_json": b'{"text": "unterminated',
    "not_utf8": b'{"text": "caf\xe9 au lait"}',
    "empty_text": b'{"text": "   \\n "}',
    "missing_field": b'{"body": "no text key"}',
    "wrong_type": b'{"text": 42}',
}
LONG_CHARS = 60_000
"""An over-long row: ~15k tokens, past SmolLM2's 8,192-token context; packing splits it into blocks."""


def _kind(i: int, kinds: list[str]) -> str | None:
    """Rows 0..k-1 of every 20 are bad, one kind each: 5% of the rows per kind."""
    return kinds[i % 20] if i % 20 < len(kinds) else None


def write_messy_text(path: Path, rows: int = 200, long_rows: int = 2) -> dict[str, list[int]]:
    """``rows`` JSONL rows, 5% of each bad kind; returns ``{kind: [1-based lines]}`` incl. ``"over_long"``."""
    from autoglm_train.data.corpora import corpus_documents

    text = "\n".join(d for _, d in zip(range(60), corpus_documents("shakespeare"), strict=False))
    assert len(text) >= rows * 400 + LONG_CHARS
    where: dict[str, list[int]] = {k: [] for k in [*TEXT_BAD_ROWS, "over_long"]}
    lines: list[bytes] = []
    for i in range(rows):
        kind = _kind(i, list(TEXT_BAD_ROWS))
        if kind is not None:
            lines.append(TEXT_BAD_ROWS[kind])
        elif i % 20 == 10 and len(where["over_long"]) < long_rows:
            kind = "over_long"
            lines.append(json.dumps({"text": text[i * 50 : i * 50 + LONG_CHARS]}).encode())
        else:
            lines.append(json.dumps({"text": text[i * 400 : i * 400 + 400]}).encode())
        if kind is not None:
            where[kind].append(i + 1)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return where


def write_messy_images(root: Path, rows: int = 100) -> dict[str, list[int]]:
    """``root/pairs.jsonl``: real 8x8 digit images named by their digit word, 5% of rows bad per kind (7 kinds)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from autoglm_train.data.multimodal.pairs import DIGIT_WORDS

    root.mkdir(parents=True, exist_ok=True)
    (root / "garbage.png").write_bytes(b"definitely not an image")
    (root / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, format="PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[:60])
    bad = {
        "corrupt image": json.dumps({"image": "garbage.png", "text": "x"}).encode(),
        "zero-length image": json.dumps({"image": "empty.png", "text": "x"}).encode(),
        "truncated image": json.dumps({"image": "truncated.png", "text": "x"}).encode(),
        "missing image": json.dumps({"image": "nowhere.png", "text": "x"}).encode(),
        "empty text": json.dumps({"image": "truncated.png", "text": "  "}).encode(),
        "bad json": b'{"image": "garbage.png", "text": "unterminated',
        "not utf-8": b'{"image": "garbage.png", "text": "caf\xe9"}',
    }
    digits = load_digits()
    where: dict[str, list[int]] = {k: [] for k in bad}
    lines: list[bytes] = []
    for i in range(rows):
        kind = _kind(i, list(bad))
        if kind is not None:
            where[kind].append(i + 1)
            lines.append(bad[kind])
            continue
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(root / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "text": DIGIT_WORDS[digits.target[i]]}).encode())
    (root / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return where


def _wav(path: Path, seconds: float, rate: int) -> None:
    samples = 0.3 * np.sin(np.linspace(0, 2 * np.pi * 220 * seconds, int(seconds * rate)))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype(np.int16).tobytes())


def write_messy_audio(root: Path, rows: int = 60) -> dict[str, list[int]]:
    """``root/asr.csv``: 0.25 s WAV clips and transcripts, 5% of rows per kind; returns ``{kind: [csv lines]}``.

    The 8 kHz and 44.1 kHz clips are good data at another rate: they must be resampled and kept, not dropped.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "garbage.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (root / "zero.wav").write_bytes(b"")
    _wav(root / "silent.wav", 0.0, 16000)
    bad = {
        "garbage wav": b"garbage.wav,say garbage",
        "zero-length file": b"zero.wav,say nothing",
        "wav without samples": b"silent.wav,say silence",
        "wrong field count": b"a.wav,b,c,d",
        "not utf-8": b"silent.wav,caf\xe9",
    }
    rates = {"8 kHz": 8000, "44.1 kHz": 44100}
    where: dict[str, list[int]] = {k: [] for k in [*bad, *rates]}
    lines = [b"path,transcript"]
    for i in range(rows):
        kind = _kind(i, [*bad, *rates])
        if kind is not None:
            where[kind].append(len(lines) + 1)
        if kind in bad:
            lines.append(bad[kind])
            continue
        _wav(root / f"clip{i}.wav", 0.25, rates.get(kind or "", 16000))
        lines.append(f"clip{i}.wav,say {i}".encode())
    (root / "asr.csv").write_bytes(b"\n".join(lines) + b"\n")
    return where
