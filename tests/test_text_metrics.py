"""WER / CER / digit accuracy: the numbers the held-out evaluation reports."""

from __future__ import annotations

import pytest

from autoglm_train.eval.text_metrics import cer, digit_accuracy, exact_match, first_digit, normalize, wer


def test_error_rates_count_substitutions_insertions_deletions():
    assert cer(["kitten"], ["sitting"]) == pytest.approx(3 / 6)  # 2 substitutions + 1 insertion
    assert wer(["a b"], [""]) == 1.0  # 2 deletions
    assert wer(["a b c"], ["a c"]) == pytest.approx(1 / 3)  # 1 deletion
    with pytest.raises(ValueError, match="empty references"):
        wer(["", "!?"], ["a", "b"])  # nothing left to score once normalised


def test_wer_is_corpus_level_and_normalised():
    # 1 substitution in 3 words + 1 deletion in 1 word = 2 edits over 4 reference words
    assert wer(["seven three nine", "one"], ["Seven, two nine.", ""]) == pytest.approx(0.5)
    assert wer(["zero"], ["zero zero zero"]) == pytest.approx(2.0)  # babbling can exceed 100%
    assert wer(["a b"], ["a b"]) == 0.0


def test_cer_counts_characters():
    assert cer(["seven"], ["seven"]) == 0.0
    assert cer(["seven"], ["sevan"]) == pytest.approx(1 / 5)


def test_digit_accuracy_reads_words_and_numerals():
    assert first_digit("a handwritten digit seven") == "seven"
    assert first_digit("It is 7.") == "seven"
    assert first_digit("no idea") is None
    assert digit_accuracy(["seven", "one", "two"], ["seven", "a handwritten digit 1", "three"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="names no digit"):
        digit_accuracy(["cat"], ["cat"])


def test_exact_match_and_normalize():
    assert normalize("  Nine,  TWO four! ") == "nine two four"
    assert exact_match(["nine two"], ["Nine two."]) == 1.0
    with pytest.raises(ValueError):
        wer(["a"], [])
