"""Your own media → text pairs: any table ``datasets`` reads, with a media column and a text column.

A table is a .jsonl/.json/.csv/.parquet file, a directory of them, a ``save_to_disk`` directory
or a Hub dataset name. Media cells are file paths (relative to the table's directory), datasets
``Image``/``Audio`` cells, or bytes. Unreadable, corrupt or empty media and empty texts are skipped
and counted; audio at another sampling rate is resampled and counted. Local .jsonl/.csv tables are
read line by line (:mod:`.table_rows`), so a broken line is skipped and counted too. Pillow decodes
images and ``soundfile`` (libsndfile) decodes audio.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from autoglm_train.data.multimodal.pairs import Pair
from autoglm_train.data.multimodal.report import SkipReport
from autoglm_train.data.multimodal.table_rows import BROKEN, ROW_SUFFIXES, WHERE, read_rows

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_QUESTIONS = {"image": "Describe the image.", "audio": "Transcribe the audio."}


class LocalPairs:
    """Pairs from a table of (media, text) rows.

    Args:
        path: table file, directory of tables, ``save_to_disk`` directory, or Hub dataset name.
        modality: ``image`` or ``audio``.
        media_column: column holding the image/audio (path, datasets cell or bytes).
        text_column: column holding the answer text (caption, transcript, ...).
        question_column: optional per-row question; else ``question`` is used for every row.
        question: the question after the media; None = "Describe the image." / "Transcribe the audio.".
        label_column: optional digit-word label scored by digit accuracy.
        split: the split to read from a Hub dataset or a ``DatasetDict``.
        sampling_rate: audio is resampled to this rate (the plugin's).
        max_items: read at most this many rows.
    """

    def __init__(
        self,
        path: str,
        modality: str = "image",
        media_column: str | None = None,
        text_column: str = "text",
        question_column: str | None = None,
        question: str | None = None,
        label_column: str | None = None,
        split: str = "train",
        sampling_rate: int = 16000,
        max_items: int | None = None,
    ) -> None:
        if modality not in DEFAULT_QUESTIONS:
            raise ValueError(f"data_mm.source.modality={modality!r}; expected image or audio")
        self.path = str(path)
        self.modality = modality
        self.media_column = media_column or modality
        self.text_column = text_column
        self.question_column = question_column
        self.question = question or DEFAULT_QUESTIONS[modality]
        self.label_column = label_column
        self.split = split
        self.sampling_rate = sampling_rate
        self.max_items = max_items

    def load(self, report: SkipReport) -> list[Pair]:
        table, columns, root = self._table()
        missing = [c for c in (self.media_column, self.text_column, self.question_column, self.label_column)
                   if c and c not in columns]  # fmt: skip
        if missing:
            raise ValueError(f"data_mm.source.path={self.path}: no column(s) {missing}; columns: {columns}")
        if self.max_items is not None:
            n = min(self.max_items, len(table))
            table = table[:n] if isinstance(table, list) else table.select(range(n))
        pairs: list[Pair] = []
        by_rate: dict[int, list[int]] = defaultdict(list)
        for index, row in enumerate(table):
            report.seen += 1
            where = row.get(WHERE) or f"{self.path} row {index}"
            if row.get(BROKEN):
                report.skip(row[BROKEN], where)
                continue
            text = row[self.text_column]
            if not isinstance(text, str) or not text.strip():
                report.skip("empty or missing text", where)
                continue
            try:
                if self.modality == "image":
                    media, rate = read_image(row[self.media_column], root), None
                else:
                    media, rate = read_audio(row[self.media_column], root)
            except MediaError as err:
                report.skip(err.reason, f"{where}: {err}")
                continue
            question = row[self.question_column] if self.question_column else self.question
            label = row[self.label_column] if self.label_column else None
            pairs.append(Pair(media, str(question), text.strip(), label, where))
            if rate is not None and rate != self.sampling_rate:
                by_rate[rate].append(len(pairs) - 1)
        self._resample(pairs, by_rate, report)
        return pairs

    def _table(self):
        """``(rows, column names, directory that relative media paths start from)``; rows: a list or a Dataset."""
        import datasets

        path = Path(self.path).expanduser()
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            table = datasets.load_from_disk(str(path))
            table = table[self.split] if isinstance(table, datasets.DatasetDict) else table
            return table, table.column_names, path
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"data_mm.source.path={path}: no {sorted(TABLE_SUFFIXES)} files")
            builders = {TABLE_SUFFIXES[p.suffix] for p in files}
            if len(builders) > 1:
                raise ValueError(f"data_mm.source.path={path}: mixes table formats {sorted(builders)}")
            root = path
        elif path.is_file():
            if path.suffix not in TABLE_SUFFIXES:
                raise ValueError(f"data_mm.source.path={path}: expected one of {sorted(TABLE_SUFFIXES)}")
            files, root = [path], path.parent
        elif path.is_absolute() or path.suffix:
            raise FileNotFoundError(f"data_mm.source.path={path}: no such file or directory")
        else:
            table = datasets.load_dataset(self.path, split=self.split)  # a Hub dataset (needs network)
            return table, table.column_names, Path.cwd()
        if all(p.suffix in ROW_SUFFIXES for p in files):
            return (*read_rows(files), root)
        builder = TABLE_SUFFIXES[files[0].suffix]
        table = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
        return table, table.column_names, root

    def _resample(self, pairs: list[Pair], by_rate: dict[int, list[int]], report: SkipReport) -> None:
        from autoglm_train.data.multimodal.espeak import resample_all

        for rate, indices in by_rate.items():
            waves = resample_all([pairs[i].media for i in indices], rate, self.sampling_rate)
            for i, resampled in zip(indices, waves, strict=True):
                pairs[i].media = resampled
            report.note(f"resampled {rate} -> {self.sampling_rate} Hz", len(indices))


class MediaError(ValueError):
    """A media cell that cannot be used; ``reason`` is the skip-report category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def read_image(cell: Any, root: Path):
    """A decoded PIL image from a path, a datasets ``Image`` cell (PIL or ``{"bytes", "path"}``) or bytes."""
    from PIL import Image, UnidentifiedImageError

    if cell is None:
        raise MediaError("missing media", "no image")
    if isinstance(cell, Image.Image):
        return cell
    source = _source(cell, root, "image")
    try:
        with Image.open(source) as image:
            image.load()  # decode now: a truncated file fails here, not in the middle of training
            return image.copy()
    except FileNotFoundError as err:
        raise MediaError("missing media file", str(err)) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise MediaError("corrupt or unreadable image", str(err)) from err


def read_audio(cell: Any, root: Path) -> tuple[np.ndarray, int]:
    """``(mono float32 waveform, sampling rate)`` from a path, a datasets ``Audio`` cell or bytes.

    Files and bytes are decoded by ``soundfile`` (libsndfile: WAV of any PCM width or float, FLAC, OGG, ...),
    the reader the server uses for ``input_audio``.
    """
    if cell is None:
        raise MediaError("missing media", "no audio")
    if isinstance(cell, dict) and cell.get("array") is not None:
        waveform, rate = np.asarray(cell["array"], dtype=np.float32), int(cell["sampling_rate"])
    else:
        source = _source(cell, root, "audio")
        if isinstance(source, Path) and not source.is_file():
            raise MediaError("missing media file", f"no such file: {source}")
        try:
            import soundfile
        except ImportError as err:
            raise ImportError(
                f"reading audio files needs soundfile: pip install 'autoglm-train[speech]' ({err})"
            ) from err
        try:
            waveform, rate = soundfile.read(source, dtype="float32")
        except soundfile.LibsndfileError as err:
            raise MediaError("unreadable audio", err.error_string) from err
    if waveform.ndim == 2:
        waveform = waveform.mean(axis=1)
    if waveform.size == 0:
        raise MediaError("empty audio", "0 samples")
    if not np.isfinite(waveform).all():
        raise MediaError("corrupt or unreadable audio", "NaN or infinite samples")
    return waveform.astype(np.float32), int(rate)


def _source(cell: Any, root: Path, kind: str):
    """A path or a byte stream for a media cell."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return io.BytesIO(cell["bytes"])
        cell = cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return io.BytesIO(cell)
    if isinstance(cell, str) and cell:
        path = Path(cell).expanduser()
        return path if path.is_absolute() else root / path
    raise MediaError("missing media", f"no {kind} in cell {type(cell).__name__}")
