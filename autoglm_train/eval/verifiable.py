"""Held-out verifiable questions through the server: does thinking help, and does the switch work?

Each question of ``verifiable.jsonl`` (``{"messages": [user], "answer": "737", "family": "addition"}``) is asked
twice through ``/v1/chat/completions``, greedy, with ``return_reasoning: true``: thinking on (a budget long
enough for a worked trace) and thinking off (a short one). Scored with the one checker
(:func:`~autoglm_train.data.verifiable.scoring.is_correct` on the ``content``):

- ``verifiable/accuracy_thinking_on`` / ``_off``, overall and per family (``.../<family>``), and their gap;
- ``verifiable/reasoning_share_on``: the share of thinking-on answers with a non-empty ``reasoning_content``;
- ``verifiable/reasoning_count_off``: thinking-off answers that came back WITH reasoning (must be 0: the
  template's empty think block closes it, so the server never hands reasoning back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_train.data.verifiable.scoring import is_correct
from autoglm_train.eval.assistant import SAMPLES, field, read_jsonl_rows, run_bounded
from autoglm_train.eval.client import Row

MODES = ("on", "off")


@dataclass(frozen=True)
class Question:
    messages: list[dict[str, Any]]
    answer: str
    family: str


@dataclass(frozen=True)
class Reply:
    """What the server answered in one mode: the ``content`` and the ``reasoning_content`` (None when absent)."""

    content: str
    reasoning: str | None

    @property
    def reasoned(self) -> bool:
        return bool(self.reasoning and self.reasoning.strip())


@dataclass(frozen=True)
class Answered:
    question: Question
    on: Reply
    off: Reply


def read_verifiable(path: str | Path, limit: int | None = None) -> list[Question]:
    return [
        Question(
            messages=field(path, number, row, "messages", list, dict),
            answer=str(field(path, number, row, "answer", (str, int))),
            family=field(path, number, row, "family", str),
        )
        for number, row in read_jsonl_rows(path, limit)
    ]


def ask(
    server: Any, questions: list[Question], think_tokens: int, direct_tokens: int, workers: int, deadline: float
) -> list[Answered]:
    """Every question in both modes (``workers`` requests in flight); those not started by ``deadline`` dropped."""

    def reply(job: tuple[Question, bool]) -> Reply:
        question, thinking = job
        budget = think_tokens if thinking else direct_tokens
        message = server.chat_message(question.messages, budget, enable_thinking=thinking, return_reasoning=True)
        return Reply(message.get("content") or "", message.get("reasoning_content"))

    jobs = [(q, thinking) for q in questions for thinking in (True, False)]
    replies = run_bounded(reply, jobs, workers, deadline)
    out = []
    for i, question in enumerate(questions):
        on, off = replies[2 * i], replies[2 * i + 1]
        if on is not None and off is not None:
            out.append(Answered(question, on, off))
    return out


def _accuracy(answered: list[Answered], mode: str) -> float | None:
    if not answered:
        return None
    return sum(is_correct(getattr(a, mode).content, a.question.answer) for a in answered) / len(answered)


def score(answered: list[Answered], seconds: float = 0.0, budgets: tuple[int, int] | None = None) -> list[Row]:
    """The metric rows of answered questions: accuracy per mode (overall, then per family), the gap,
    and how the reasoning switch behaved."""
    n = len(answered)
    on_note = "greedy, enable_thinking=true" + (f", max {budgets[0]} tokens" if budgets else "")
    off_note = "greedy, enable_thinking=false" + (f", max {budgets[1]} tokens" if budgets else "")
    on, off = _accuracy(answered, "on"), _accuracy(answered, "off")
    rows = [
        Row("verifiable/accuracy_thinking_on", on, n, seconds, on_note + "; is_correct(content, answer)"),
        Row("verifiable/accuracy_thinking_off", off, n, 0.0, off_note),
        Row(
            "verifiable/thinking_gain",
            None if on is None or off is None else on - off,
            n,
            0.0,
            "on - off (points / 100)",
        ),
        Row(
            "verifiable/reasoning_share_on",
            sum(a.on.reasoned for a in answered) / n if n else None,
            n,
            0.0,
            "thinking-on answers with non-empty reasoning_content",
        ),
        Row(
            "verifiable/reasoning_count_off",
            float(sum(a.off.reasoned for a in answered)),
            n,
            0.0,
            "thinking-off answers WITH reasoning_content (must be 0)",
        ),
    ]
    for family in sorted({a.question.family for a in answered}):
        group = [a for a in answered if a.question.family == family]
        for mode in MODES:
            value = _accuracy(group, mode)
            rows.append(Row(f"verifiable/accuracy_thinking_{mode}/{family}", value, len(group), 0.0, family))
    return rows


def samples(answered: list[Answered], count: int = SAMPLES) -> list[dict[str, Any]]:
    """The first few questions with both replies, one per family first (so the report shows each kind)."""
    chosen, seen = [], set()
    for a in answered:
        if a.question.family not in seen:
            seen.add(a.question.family)
            chosen.append(a)
    chosen += [a for a in answered if a not in chosen]
    return [
        {
            "question": a.question.messages[-1]["content"],
            "family": a.question.family,
            "answer": a.question.answer,
            **{
                f"thinking_{mode}": {
                    "reasoning_content": getattr(a, mode).reasoning,
                    "content": getattr(a, mode).content,
                    "correct": is_correct(getattr(a, mode).content, a.question.answer),
                }
                for mode in MODES
            },
        }
        for a in chosen[:count]
    ]


def verifiable_rows(
    server: Any, questions: list[Question], think_tokens: int, direct_tokens: int, workers: int, deadline: float
) -> tuple[list[Row], list[dict[str, Any]]]:
    start = time.perf_counter()
    answered = ask(server, questions, think_tokens, direct_tokens, workers, deadline)
    rows = score(answered, time.perf_counter() - start, (think_tokens, direct_tokens))
    if len(answered) < len(questions):
        rows[0].note += f"; {len(questions) - len(answered)} questions skipped at the time limit"
    return rows, samples(answered)
