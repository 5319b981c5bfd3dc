"""WER / CER / digit accuracy: the numbers the held-out evaluation reports."""

from __future__ import annotations

import pytest

from autoglm_train.eval.text_metrics import cer, digit_accuracy, edit_distance, exact_match, first_digit, normalize, wer


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1


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
