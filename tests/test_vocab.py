"""Vocabulary preflight: shared ids, padded teachers truncated, real mismatches refused."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from autoglm_train.distill.vocab import VocabMismatchError, check_same_vocab, plan_vocab, student_tokenizer
from autoglm_train.model.decoder import MODALITY_TOKENS


def _wordlevel(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_student_tokenizer_extends_teacher_with_placeholders():
    teacher = _wordlevel(["to", "be", "or", "not"])
    base = len(teacher)
    student = student_tokenizer(teacher)
    vocab = student.get_vocab()
    assert all(t in vocab for t in MODALITY_TOKENS)
    assert min(vocab[t] for t in MODALITY_TOKENS) >= base
    plan = plan_vocab(base, base, student)
    assert plan.kd_vocab_size == base
    assert set(plan.placeholder_ids) == set(MODALITY_TOKENS)
    assert student.pad_token is not None


def test_padded_teacher_is_truncated_with_a_log_line(caplog):
    teacher = _wordlevel(["a", "b"])
    with caplog.at_level(logging.INFO):
        plan = plan_vocab(64, len(teacher), student_tokenizer(teacher))
    assert plan.kd_vocab_size == len(_wordlevel(["a", "b"]))
    assert "teacher vocab padded (64 rows, 3 tokens)" in caplog.text


def test_teacher_with_too_few_rows_names_both_sizes():
    teacher = _wordlevel(["a", "b", "c"])
    with pytest.raises(VocabMismatchError, match="teacher has 2 output rows but its tokenizer has 4 tokens"):
        plan_vocab(2, len(teacher), teacher)


def test_different_student_tokenizer_is_refused_with_sizes():
    teacher = _wordlevel(["to", "be", "or", "not"])
    other = _wordlevel(["be", "to", "or"])
    with pytest.raises(VocabMismatchError, match=r"student tokenizer \(4 tokens\).*teacher's \(5 tokens\)"):
        check_same_vocab(teacher, other)
    with pytest.raises(VocabMismatchError):
        student_tokenizer(teacher, other)
