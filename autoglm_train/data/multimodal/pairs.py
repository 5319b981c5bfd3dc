"""One training example of a plugin: a raw media item, a question about it and the answer text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from autoglm_train.data.multimodal.report import SkipReport

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The labels digit pairs carry (spoken and written digits alike); digit accuracy scores answers against them."""


@dataclass
class Pair:
    """A media item with the text the decoder should produce for it.

    Args:
        media: an image (numpy array or PIL image) or a waveform (1-D array, or ``(array, rate)``).
        question: the text after the media placeholders, e.g. ``"What digit is this?"``.
        answer: the target text, e.g. ``"seven"``.
        label: a class name scored by digit accuracy (e.g. ``"seven"``), or None.
        where: where the item came from, for skip reports.
    """

    media: Any
    question: str
    answer: str
    label: str | None = None
    where: str = ""


class PairSource(Protocol):
    """Anything that yields pairs: ``modality`` is ``"image"`` or ``"audio"``."""

    modality: str

    def load(self, report: SkipReport) -> list[Pair]:
        """All usable pairs; bad items go to ``report``."""
        ...
