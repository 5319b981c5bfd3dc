"""The verifiable families' solvers: exact trace formats, and answers equal to Python's arithmetic."""

from __future__ import annotations

import random

import pytest

from autoglm_train.data.verifiable import FAMILIES, answer_sentence, generate, is_correct
from autoglm_train.data.verifiable.families import (
    COUNT_WORDS,
    WEEKDAYS,
    solve_addition,
    solve_digit_sum,
    solve_multiplication,
    solve_subtraction,
    solve_weekday,
    solve_word_count,
)

EXACT = [
    (solve_addition(478, 259), "8+9=17, write 7 carry 1\n7+5+1=13, write 3 carry 1\n4+2+1=7, write 7\nso 737", "737"),
    (solve_addition(423, 142), "3+2=5, write 5\n2+4=6, write 6\n4+1=5, write 5\nso 565", "565"),
    (
        solve_addition(786, 785),
        "6+5=11, write 1 carry 1\n8+8+1=17, write 7 carry 1\n7+7+1=15, write 5 carry 1\ncarry 1, write 1\nso 1571",
        "1571",
    ),
    (solve_subtraction(734, 258), "4-8: borrow, 14-8=6\n3-1-5: borrow, 12-5=7\n7-1-2=4\nso 476", "476"),
    (solve_subtraction(734, 725), "4-5: borrow, 14-5=9\n3-1-2=0\n7-7=0\nso 9", "9"),
    (solve_subtraction(800, 199), "0-9: borrow, 10-9=1\n0-1-9: borrow, 9-9=0\n8-1-1=6\nso 601", "601"),
    (
        solve_multiplication(347, 6),
        "7×6=42, write 2 carry 4\n4×6+4=28, write 8 carry 2\n3×6+2=20, write 20\nso 2082",
        "2082",
    ),
    (solve_multiplication(102, 3), "2×3=6, write 6\n0×3=0, write 0\n1×3=3, write 3\nso 306", "306"),
    (solve_digit_sum([3, 5, 2, 7, 4]), "3+5=8\n8+2=10\n10+7=17\n17+4=21", "21"),
    (
        solve_word_count(["dog", "cat", "bird", "cat", "fish", "cat"], "cat"),
        "dog 0\ncat 1\nbird 1\ncat 2\nfish 2\ncat 3",
        "3",
    ),
    (
        solve_word_count(["dog", "bird", "fish", "egg", "cup", "sun"], "cat"),
        "dog 0\nbird 0\nfish 0\negg 0\ncup 0\nsun 0",
        "0",
    ),
    (solve_weekday("Monday", 23), "23 = 3×7 + 2\nMonday + 2: Tuesday, Wednesday", "Wednesday"),
    (solve_weekday("Monday", 14), "14 = 2×7 + 0\nMonday + 0: Monday", "Monday"),
    (solve_weekday("Saturday", 3), "3 = 0×7 + 3\nSaturday + 3: Sunday, Monday, Tuesday", "Tuesday"),
]


@pytest.mark.parametrize(("solved", "reasoning", "answer"), EXACT)
def test_trace_formats_are_exact(solved: tuple[str, str], reasoning: str, answer: str) -> None:
    assert solved == (reasoning, answer)


def _expected(family: str, question: str) -> str:
    """The answer recomputed from the question text alone, by Python."""
    if family == "word_count":
        quoted = question.split('"')[1::2]  # the target word, and the list in the "In the list" wording
        target, listed = (quoted[1], quoted[0]) if len(quoted) == 2 else (quoted[0], question.split(": ")[-1])
        return str(listed.rstrip("?.").split().count(target))
    if family == "weekday":
        words = question.replace(",", " ").replace(".", " ").split()
        today = next(w for w in words if w in WEEKDAYS)
        days = next(int(w) for w in words if w.isdigit())
        return WEEKDAYS[(WEEKDAYS.index(today) + days) % 7]
    numbers = [int(w) for w in question.replace("?", " ").replace(".", " ").replace(":", " ").split() if w.isdigit()]
    if family.startswith("addition"):
        return str(numbers[0] + numbers[1])
    if family.startswith("subtraction"):
        a, b = (numbers[1], numbers[0]) if question.startswith("Subtract") else numbers
        return str(a - b)
    if family == "multiplication":
        return str(numbers[0] * numbers[1])
    return str(sum(numbers))


@pytest.mark.parametrize("family", FAMILIES)
def test_solver_answers_match_python_on_thousands_of_items(family: str) -> None:
    rng = random.Random(f"check:{family}")
    for _ in range(3000):
        item = generate(family, rng)
        assert item.family == family
        assert item.answer == _expected(family, item.question), item
        assert is_correct(answer_sentence(item.answer), item.answer)
        if family in ("addition", "subtraction", "multiplication"):
            assert item.reasoning.endswith(f"\nso {item.answer}")
            assert all(len(line) <= 32 for line in item.reasoning.split("\n")), item.reasoning


def test_generators_stay_in_their_ranges() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        assert int(generate("subtraction", rng).answer) >= 1  # a > b
        digits = generate("digit_sum", rng)
        assert 4 <= len(digits.reasoning.split("\n")) <= 6  # 5 to 7 numbers
        count = generate("word_count", rng)
        words = count.reasoning.split("\n")
        assert 6 <= len(words) <= 10 and all(line.split()[0] in COUNT_WORDS for line in words)
        assert 0 <= int(count.answer) <= 6
        days = int(generate("weekday", rng).reasoning.split(" =")[0])
        assert 1 <= days <= 60


def test_same_seed_same_items_and_unknown_family_is_named() -> None:
    first = [generate(f, random.Random(3)) for f in FAMILIES]
    assert first == [generate(f, random.Random(3)) for f in FAMILIES]
    with pytest.raises(ValueError, match="available: addition"):
        generate("division", random.Random(0))
