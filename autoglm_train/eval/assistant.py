"""The assistant on held-out chat prompts, through the server: KL to the teacher on its answers, plain English.

``chat.jsonl`` (written by :mod:`autoglm_train.pipeline.heldout`) holds, per prompt, the user ``messages``, the
``prompt_ids`` the server renders for them thinking-off, and a teacher answer sampled at temperature 1 under
exactly that rendering: ``answer_ids``, the teacher's log-probability of each (``teacher_logprobs``) and its most
likely token at each answer position (``teacher_top1``).

**KL(teacher‖student)**: the answers ``y ~ p_T(· | x)`` are samples of the teacher itself, so for every answer
position ``t``

    KL_t = E_{y_t ~ p_T(· | x, y_<t)} [log p_T(y_t | x, y_<t) − log p_S(y_t | x, y_<t)]

and the mean of ``teacher_logprob − student_logprob`` over all answer tokens of all answers is an unbiased
Monte-Carlo estimate of the per-token KL(teacher‖student) along the teacher's own trajectories (the quantity
token-level KD on teacher answers minimises). The student's log-probs come from ``/v1/completions`` with the
token-id prompt ``prompt_ids + answer_ids``, ``echo=true, max_tokens=0, logprobs=1``, so they are the served
model's, under the served rendering. **Top-1 agreement**: the served top-1 token id equals the teacher's at each
of those positions.

**Non-degenerate English**: the student's greedy answer through ``/v1/chat/completions`` (thinking off) passes
:func:`degeneracy` — the issue's "≥ 4 distinct words, no single token > 40% of the answer", plus mostly
ASCII text, which rules out byte soup that happens to hold four words.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from string import ascii_letters, digits, punctuation
from typing import Any, TypeVar

from autoglm_train.eval.client import Row

T = TypeVar("T")
R = TypeVar("R")

SAMPLES = 4
"""(prompt, answer) pairs kept in the evaluation's JSON for the report."""
_WORD = re.compile(r"[A-Za-z']+")
_PLAIN = set(ascii_letters + digits + punctuation)


@dataclass(frozen=True)
class ChatItem:
    """One held-out chat prompt and the teacher's sampled answer to it."""

    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    answer_ids: list[int]
    teacher_logprobs: list[float]
    teacher_top1: list[int]


def read_jsonl_rows(path: str | Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a jsonl file; a line that is not a JSON object is an error naming file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
        if limit and len(rows) == limit:
            break
    return rows


def field(path: str | Path, number: int, row: dict[str, Any], name: str, kind: type, item: type | None = None) -> Any:
    """``row[name]`` checked to be a ``kind`` (of ``item`` s); the error names file, line and field."""
    value = row.get(name)
    ok = isinstance(value, kind) and (item is None or all(isinstance(v, item) for v in value))
    if not ok or (kind is list and not value):
        what = f"a non-empty list of {item.__name__}" if item else kind.__name__
        raise ValueError(f"{path}:{number}: field '{name}' must be {what}, got {str(value)[:60]!r}")
    return value


def read_chat(path: str | Path, limit: int | None = None) -> list[ChatItem]:
    items = []
    for number, row in read_jsonl_rows(path, limit):
        answer = field(path, number, row, "answer_ids", list, int)
        item = ChatItem(
            messages=field(path, number, row, "messages", list, dict),
            prompt_ids=field(path, number, row, "prompt_ids", list, int),
            answer_ids=answer,
            teacher_logprobs=[float(v) for v in field(path, number, row, "teacher_logprobs", list, (int, float))],
            teacher_top1=field(path, number, row, "teacher_top1", list, int),
        )
        if not len(answer) == len(item.teacher_logprobs) == len(item.teacher_top1):
            raise ValueError(f"{path}:{number}: answer_ids, teacher_logprobs and teacher_top1 differ in length")
        items.append(item)
    return items


def run_bounded(fn: Callable[[T], R], items: Iterable[T], workers: int, deadline: float) -> list[R | None]:
    """``fn`` over ``items``, ``workers`` requests in flight (so the server batches them); an item not started by
    ``deadline`` (``time.monotonic()``) is skipped as None, so a slow server bounds the evaluation's time."""

    def one(x: T) -> R | None:
        return None if time.monotonic() > deadline else fn(x)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, items))


def _token_id(name: str) -> int:
    """``token_id:N`` (``return_tokens_as_token_ids``) → N."""
    prefix, _, number = name.partition(":")
    if prefix != "token_id" or not number.lstrip("-").isdigit():
        raise ValueError(f"expected a token named 'token_id:N', got {name!r}")
    return int(number)


def student_scores(logprobs: dict[str, Any], item: ChatItem) -> tuple[list[float], list[int]]:
    """The served log-prob and top-1 id at each answer position of an echoed ``prompt_ids + answer_ids``."""
    ids = [_token_id(t) for t in logprobs["tokens"]]
    if ids != [*item.prompt_ids, *item.answer_ids]:
        raise ValueError("the server echoed other token ids than the prompt it was sent")
    start = len(item.prompt_ids)
    scored = logprobs["token_logprobs"][start:]
    tops = [max(top, key=top.get) for top in logprobs["top_logprobs"][start:]]
    return [float(v) for v in scored], [_token_id(t) for t in tops]


def kl_rows(server: Any, items: list[ChatItem], workers: int, deadline: float) -> list[Row]:
    """``chat/kl_to_teacher`` (nats per answer token, the estimator in the module docstring) and
    ``chat/teacher_top1_agreement``, over every answer token of the items answered before ``deadline``."""
    start = time.perf_counter()
    scored = run_bounded(lambda it: server.token_logprobs([*it.prompt_ids, *it.answer_ids]), items, workers, deadline)
    gap = same = tokens = answered = 0
    for item, logprobs in zip(items, scored, strict=True):
        if logprobs is None:
            continue
        student, top1 = student_scores(logprobs, item)
        gap += sum(t - s for t, s in zip(item.teacher_logprobs, student, strict=True))
        same += sum(a == b for a, b in zip(item.teacher_top1, top1, strict=True))
        tokens += len(student)
        answered += 1
    seconds = time.perf_counter() - start
    note = f"{answered} teacher answers (T=1 samples), mean of log p_T - log p_S per answer token"
    if answered < len(items):
        note += f"; {len(items) - answered} skipped at the time limit"
    return [
        Row("chat/kl_to_teacher", gap / tokens if tokens else None, tokens, seconds, note),
        Row(
            "chat/teacher_top1_agreement", same / tokens if tokens else None, tokens, 0.0, "served top-1 id = teacher's"
        ),
    ]


def degeneracy(text: str) -> str | None:
    """Why ``text`` is not a plain-English answer, or None when it is.

    Non-degenerate: at least 4 distinct words (casefolded ``[A-Za-z']+``), no single whitespace-separated token
    over 40% of the answer's tokens, and at least 80% of its non-space characters ASCII letters, digits or
    punctuation.
    """
    words = {w.casefold() for w in _WORD.findall(text)}
    if len(words) < 4:
        return f"{len(words)} distinct words"
    tokens = text.split()
    token, count = Counter(tokens).most_common(1)[0]
    if count > 0.4 * len(tokens):
        return f"{token!r} is {count} of {len(tokens)} tokens"
    chars = [c for c in text if not c.isspace()]
    plain = sum(c in _PLAIN for c in chars)
    if plain < 0.8 * len(chars):
        return f"{plain} of {len(chars)} characters are ASCII letters, digits or punctuation"
    return None


def english_row(
    server: Any, items: list[ChatItem], max_tokens: int, workers: int, deadline: float
) -> tuple[Row, list[dict[str, Any]]]:
    """``chat/non_degenerate_english``: the share of greedy thinking-off answers that pass :func:`degeneracy`;
    and the first few (prompt, answer) pairs."""
    start = time.perf_counter()

    def ask(item: ChatItem) -> str:
        message = server.chat_message(item.messages, max_tokens, enable_thinking=False)
        return message.get("content") or ""

    answers = run_bounded(ask, items, workers, deadline)
    done = [(item, a) for item, a in zip(items, answers, strict=True) if a is not None]
    verdicts = [degeneracy(a) for _, a in done]
    good = sum(v is None for v in verdicts)
    samples = [
        {"prompt": item.messages[-1]["content"], "answer": a, "degenerate": why}
        for (item, a), why in list(zip(done, verdicts, strict=True))[:SAMPLES]
    ]
    note = f"greedy, thinking off, max {max_tokens} tokens; >= 4 distinct words, no token > 40%, >= 80% ASCII"
    if len(done) < len(items):
        note += f"; {len(items) - len(done)} skipped at the time limit"
    value = good / len(done) if done else None
    return Row("chat/non_degenerate_english", value, len(done), time.perf_counter() - start, note), samples
