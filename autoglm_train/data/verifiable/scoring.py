"""The one answer checker of verifiable questions: training data writes answers in this form, evaluation reads it.

Every solver-written turn ends its content with ``The answer is X.`` (:func:`answer_sentence`), thinking on or
off; the evaluation (through the server or in-process) extracts ``X`` from the model's content with
:func:`extract_answer` and compares it exactly (case and surrounding whitespace aside) with the gold answer.
Anything else the model writes (no sentence, another number) is wrong: exact match, no partial credit.
"""

from __future__ import annotations

import re

_ANSWER = re.compile(r"answer is\s*:?\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)


def answer_sentence(answer: str) -> str:
    """The content of a solver-written assistant turn."""
    return f"The answer is {answer}."


def extract_answer(content: str) -> str | None:
    """``X`` of the last ``The answer is X.`` in ``content`` (first line after it only), or None."""
    at = content.lower().rfind("answer is")
    if at < 0:
        return None
    tail = content[at:].split("\n", 1)[0]
    match = _ANSWER.match(tail)
    return match.group(1).strip() if match else None


def is_correct(content: str, answer: str) -> bool:
    """Exact match of the extracted answer (case-insensitive) with the gold ``answer``."""
    got = extract_answer(content)
    return got is not None and got.casefold() == answer.strip().casefold()
