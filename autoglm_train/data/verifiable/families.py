"""Verifiable task families: a generator draws a question, a solver writes the worked steps and the answer.

These are the offline trace source of hybrid thinking (issue 28): a small model cannot do the direct answer
(a 3-digit sum in one step) but can do each step, so thinking measurably helps. Every trace line is a local,
easy operation on digits in view, and the traces are as short as the steps allow, because every target token
costs training time. The formats are fixed here and checked by exact examples in the tests; a question's wording
varies by template (so the student does not learn one sentence), its trace never does.

The assistant content of a solved item is always ``answer_sentence(item.answer)``
(:mod:`autoglm_train.data.verifiable.scoring`), thinking on or off; the reasoning goes in the think block.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
COUNT_WORDS = (
    "apple", "ball", "bird", "boat", "book", "box", "bread", "car", "cat", "chair",
    "cloud", "coin", "cup", "desk", "dog", "door", "egg", "fish", "flower", "frog",
    "hat", "horse", "house", "key", "lamp", "leaf", "moon", "mouse", "pen", "rain",
    "ring", "rock", "shoe", "star", "sun", "table", "tree", "train", "window", "wolf",
)  # fmt: skip
"""The ~40 common one-token-ish nouns the ``word_count`` lists are drawn from."""


@dataclass(frozen=True)
class VerifiableItem:
    """One question with its solver-written worked steps (``reasoning``) and the exact ``answer``."""

    family: str
    question: str
    reasoning: str
    answer: str


def problem_key(item: VerifiableItem) -> tuple[str, str, str]:
    """What identifies the problem regardless of the question's wording: the steps determine it.

    Used to keep held-out problems out of training even when a training template phrases them differently.
    """
    return (item.family, item.reasoning, item.answer)


def _digits(n: int) -> list[int]:
    """Digits of ``n``, ones first."""
    return [int(c) for c in reversed(str(n))]


def solve_addition(a: int, b: int) -> tuple[str, str]:
    """Column addition, ones first: ``8+9=17, write 7 carry 1`` per column, then ``so <sum>``."""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    lines: list[str] = []
    carry = 0
    for x, y in zip(da, db, strict=True):
        total = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry = total // 10
        lines.append(f"{expr}={total}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    if carry:
        lines.append(f"carry {carry}, write {carry}")
    lines.append(f"so {a + b}")
    return "\n".join(lines), str(a + b)


def solve_subtraction(a: int, b: int) -> tuple[str, str]:
    """Column subtraction with borrows, ones first: ``4-8: borrow, 14-8=6``, then ``so <difference>``."""
    if a < b:
        raise ValueError(f"subtraction needs a >= b, got {a} - {b}")
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    lines: list[str] = []
    borrow = 0
    for x, y in zip(da, db, strict=True):
        left = f"{x}-1-{y}" if borrow else f"{x}-{y}"
        have = x - borrow
        if have < y:
            lines.append(f"{left}: borrow, {have + 10}-{y}={have + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{left}={have - y}")
            borrow = 0
    lines.append(f"so {a - b}")  # str(int) drops the leading zeros the columns wrote
    return "\n".join(lines), str(a - b)


def solve_multiplication(a: int, m: int) -> tuple[str, str]:
    """Multi-digit × one digit, ones first: ``4×6+4=28, write 8 carry 2``; the last column writes its whole value."""
    if not 0 <= m <= 9:
        raise ValueError(f"multiplication needs a one-digit multiplier, got {m}")
    da = _digits(a)
    lines: list[str] = []
    carry = 0
    for i, x in enumerate(da):
        total = x * m + carry
        expr = f"{x}×{m}" + (f"+{carry}" if carry else "")
        if i == len(da) - 1:
            lines.append(f"{expr}={total}, write {total}")
        else:
            carry = total // 10
            lines.append(f"{expr}={total}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    lines.append(f"so {a * m}")
    return "\n".join(lines), str(a * m)


def solve_digit_sum(digits: list[int]) -> tuple[str, str]:
    """Running sum, one addition per line: ``3+5=8``, ``8+2=10``, …; the last line's value is the answer."""
    if len(digits) < 2:
        raise ValueError(f"a running sum needs at least two numbers, got {digits}")
    lines: list[str] = []
    total = digits[0]
    for d in digits[1:]:
        lines.append(f"{total}+{d}={total + d}")
        total += d
    return "\n".join(lines), str(total)


def solve_word_count(words: list[str], target: str) -> tuple[str, str]:
    """One line per word with the running count of ``target``: ``dog 0``, ``cat 1``, …"""
    lines: list[str] = []
    count = 0
    for word in words:
        count += word == target
        lines.append(f"{word} {count}")
    return "\n".join(lines), str(count)


def solve_weekday(today: str, days: int) -> tuple[str, str]:
    """``23 = 3×7 + 2`` then step through the remainder: ``Monday + 2: Tuesday, Wednesday``."""
    start = WEEKDAYS.index(today)
    weeks, rest = divmod(days, 7)
    steps = [WEEKDAYS[(start + k) % 7] for k in range(1, rest + 1)]
    walk = ", ".join(steps) if steps else today
    answer = WEEKDAYS[(start + rest) % 7]
    return f"{days} = {weeks}×7 + {rest}\n{today} + {rest}: {walk}", answer


def _three_digit(rng: random.Random) -> int:
    return rng.randint(100, 999)


def _addition(rng: random.Random, digits: int = 3, family: str = "addition") -> VerifiableItem:
    low = 10 ** (digits - 1)
    a, b = rng.randint(low, 10 * low - 1), rng.randint(low, 10 * low - 1)
    template = rng.choice(("What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}."))
    return VerifiableItem(family, template.format(a=a, b=b), *solve_addition(a, b))


def _subtraction(rng: random.Random, digits: int = 3, family: str = "subtraction") -> VerifiableItem:
    low = 10 ** (digits - 1)
    a, b = rng.sample(range(low, 10 * low), 2)
    a, b = max(a, b), min(a, b)
    template = rng.choice(("What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}."))
    return VerifiableItem(family, template.format(a=a, b=b), *solve_subtraction(a, b))


def _multiplication(rng: random.Random) -> VerifiableItem:
    a, m = _three_digit(rng), rng.randint(2, 9)
    template = rng.choice(("What is {a} × {m}?", "Calculate {a} × {m}.", "Multiply {a} by {m}."))
    return VerifiableItem("multiplication", template.format(a=a, m=m), *solve_multiplication(a, m))


def _digit_sum(rng: random.Random) -> VerifiableItem:
    digits = [rng.randint(1, 9) for _ in range(rng.randint(5, 7))]
    terms = " + ".join(map(str, digits))
    template = rng.choice(("What is {t}?", "Calculate {t}.", "Add these up: {t}."))
    return VerifiableItem("digit_sum", template.format(t=terms), *solve_digit_sum(digits))


def _word_count(rng: random.Random) -> VerifiableItem:
    n = rng.randint(6, 10)
    target = rng.choice(COUNT_WORDS)
    hits = rng.randint(0, min(6, n))
    others = [w for w in COUNT_WORDS if w != target]
    words = [target] * hits + [rng.choice(others) for _ in range(n - hits)]
    rng.shuffle(words)
    template = rng.choice(
        (
            'How many times does the word "{w}" appear in: {s}?',
            'Count how many times "{w}" appears in: {s}.',
            'In the list "{s}", how many times does "{w}" occur?',
        )
    )
    question = template.format(w=target, s=" ".join(words))
    return VerifiableItem("word_count", question, *solve_word_count(words, target))


def _weekday(rng: random.Random) -> VerifiableItem:
    today, days = rng.choice(WEEKDAYS), rng.randint(1, 60)
    template = rng.choice(
        (
            "Today is {d}. What day of the week will it be in {n} days?",
            "If today is {d}, what day will it be {n} days from now?",
            "It is {d} today. Which day of the week is it in {n} days?",
        )
    )
    return VerifiableItem("weekday", template.format(d=today, n=days), *solve_weekday(today, days))


_GENERATORS: dict[str, Callable[[random.Random], VerifiableItem]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "digit_sum": _digit_sum,
    "word_count": _word_count,
    "weekday": _weekday,
    # two-digit sums and differences: the same column traces, learned within the CPU demo's few minutes
    "addition_2digit": lambda rng: _addition(rng, 2, "addition_2digit"),
    "subtraction_2digit": lambda rng: _subtraction(rng, 2, "subtraction_2digit"),
}
FAMILIES: tuple[str, ...] = tuple(_GENERATORS)


def check_families(families: object) -> tuple[str, ...]:
    """``families`` as a non-empty tuple of known names, or a ValueError listing the available ones."""
    if isinstance(families, str) or not families:
        raise ValueError(f"families must be a non-empty list of family names; available: {', '.join(FAMILIES)}")
    names = tuple(families)  # type: ignore[arg-type]
    unknown = [f for f in names if f not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown verifiable family {unknown[0]!r}; available: {', '.join(FAMILIES)}")
    return names


def generate(family: str, rng: random.Random) -> VerifiableItem:
    """Draw one item of ``family`` from ``rng`` (deterministic for a seeded ``rng``)."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown verifiable family {family!r}; available: {', '.join(FAMILIES)}")
    return _GENERATORS[family](rng)
