"""Vocabulary preflight: teacher and student must score the same token ids.

Runs before any training step so a mismatch costs seconds, not a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from autoglm_train.errors import ConfigValueError
from autoglm_train.model.decoder import MODALITY_TOKENS

log = logging.getLogger(__name__)


class VocabMismatchError(ConfigValueError):
    """Teacher and student tokenizers do not share ids."""


@dataclass(frozen=True)
class VocabPlan:
    """How many leading vocab columns the KD loss compares, and the student's reserved ids."""

    kd_vocab_size: int
    placeholder_ids: dict[str, int]


def student_tokenizer(teacher_tokenizer, student_tokenizer=None):
    """The student's tokenizer: the teacher's (default) plus reserved modality placeholders."""
    tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    check_same_vocab(teacher_tokenizer, tokenizer)
    missing = [t for t in MODALITY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocab(teacher_tokenizer, tokenizer) -> None:
    """Every teacher token id must mean the same string for the student."""
    if tokenizer is teacher_tokenizer:
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), tokenizer.get_vocab()
    if len(s_vocab) < len(t_vocab) or any(s_vocab.get(tok) != i for tok, i in t_vocab.items()):
        raise VocabMismatchError(
            f"student tokenizer ({len(s_vocab)} tokens) does not extend the teacher's ({len(t_vocab)} tokens) "
            "id for id; logit distillation needs shared ids: set recipe.student_tokenizer=null"
        )


def plan_vocab(teacher_vocab_rows: int, base_tokenizer_size: int, tokenizer) -> VocabPlan:
    """Check the teacher's output rows against its tokenizer and fix the compared width.

    A teacher with *more* rows than tokens (padded for speed) is truncated to the tokenizer;
    one with *fewer* rows cannot score every token and is refused.
    """
    if teacher_vocab_rows < base_tokenizer_size:
        raise VocabMismatchError(
            f"teacher has {teacher_vocab_rows} output rows but its tokenizer has {base_tokenizer_size} tokens"
        )
    if teacher_vocab_rows > base_tokenizer_size:
        log.info(
            "teacher vocab padded (%d rows, %d tokens): extra rows truncated for KD",
            teacher_vocab_rows,
            base_tokenizer_size,
        )
    vocab = tokenizer.get_vocab()
    return VocabPlan(
        kd_vocab_size=base_tokenizer_size, placeholder_ids={t: vocab[t] for t in MODALITY_TOKENS if t in vocab}
    )
