"""Verifiable task families: questions whose solver writes the worked steps, and the one answer checker."""

from autoglm_train.data.verifiable.families import FAMILIES, VerifiableItem, generate
from autoglm_train.data.verifiable.scoring import answer_sentence, extract_answer, is_correct

__all__ = ["FAMILIES", "VerifiableItem", "answer_sentence", "extract_answer", "generate", "is_correct"]
