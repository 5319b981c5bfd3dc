"""The GLM decoder: stock transformers class, 9B shape counted without allocation."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import GlmForCausalLM

from autoglm_train.model.decoder import DecoderSpec, build_decoder, count_parameters
from tests.conftest import REPO, micro_spec


def _spec(name: str) -> DecoderSpec:
    return instantiate(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))


def test_9b_shape_on_meta_device_has_glm4_9b_parameter_count():
    spec = _spec("autoglm_phone_9b")
    model = build_decoder(spec, tokenizer_size=151_552, pad_token_id=151_329, device="meta")
    assert isinstance(model, GlmForCausalLM)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_parameters(model) == 9_399_951_360
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        40,
        4096,
        32,
        2,
    )
    assert (cfg.intermediate_size, cfg.vocab_size) == (13696, 151552)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5


def test_tiny_student_is_small_and_runs(student_tok):
    spec = _spec("tiny")
    model = build_decoder(spec, len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id)
    n = count_parameters(model)
    assert 5_000_000 < n < 30_000_000
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(student_tok)
    ids = student_tok("To be, or not to be", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_spec_checks_name_the_key():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        micro_spec(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        micro_spec(partial_rotary_factor=0.0)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        micro_spec(vocab_size=10).padded_vocab(100)
