"""Word/character error rates, digit accuracy and exact match, on normalised text.

``jiwer`` computes WER and CER: corpus-level (total edits / total reference units), as the ASR
literature reports them, so long references weigh more than short ones. What stays here is the
project's normalisation (:func:`normalize`), applied to both sides before jiwer sees them, and
the refusal of a corpus with no reference words: a rate over zero reference units is undefined,
where jiwer 4 returns the raw edit count.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

import jiwer

from autoglm_train.data.multimodal.pairs import DIGIT_WORDS

_WORD_OF = {**{w: w for w in DIGIT_WORDS}, **{str(i): w for i, w in enumerate(DIGIT_WORDS)}}
_TOKEN = re.compile(r"[a-z0-9']+")


def normalize(text: str) -> str:
    """Lower case, unicode-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_TOKEN.findall(text))


def _error_rate(refs: Sequence[str], hyps: Sequence[str], measure: Callable[[list[str], list[str]], float]) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    refs, hyps = [normalize(r) for r in refs], [normalize(h) for h in hyps]
    if not any(refs):
        raise ValueError("error rate over empty references")
    return float(measure(refs, hyps))


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate: word edits / reference words (can exceed 1 when the output babbles)."""
    return _error_rate(refs, hyps, jiwer.wer)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate over normalised text (spaces count as characters)."""
    return _error_rate(refs, hyps, jiwer.cer)


def first_digit(text: str) -> str | None:
    """The first digit named in ``text`` ("seven" or "7" → "seven"), or None."""
    for token in normalize(text).split():
        if token in _WORD_OF:
            return _WORD_OF[token]
    return None


def digit_accuracy(labels: Sequence[str], hyps: Sequence[str]) -> float:
    """Fraction of outputs whose first named digit is the label (a digit word)."""
    if len(labels) != len(hyps) or not labels:
        raise ValueError(f"need as many outputs as labels (got {len(labels)} labels, {len(hyps)} outputs)")
    gold = [first_digit(label) for label in labels]
    if None in gold:
        raise ValueError(f"label {labels[gold.index(None)]!r} names no digit")
    return sum(first_digit(h) == g for g, h in zip(gold, hyps, strict=True)) / len(labels)


def exact_match(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Fraction of outputs equal to the reference after normalisation."""
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need as many outputs as references (got {len(refs)} and {len(hyps)})")
    return sum(normalize(r) == normalize(h) for r, h in zip(refs, hyps, strict=True)) / len(refs)
