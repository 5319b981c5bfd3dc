"""Plugins fused into the decoder: no-op at birth, on demand, and a new modality by config."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from autoglm_train.distill.vocab import plan_vocab
from autoglm_train.model.freeze import freeze
from autoglm_train.model.modular import ModularLM
from autoglm_train.model.plugin_io import save_plugin
from autoglm_train.model.registry import UnknownPluginError, instantiate_plugin, plugin_config
from tests.conftest import REPO

TOY_CONF = REPO / "tests" / "toy"


def _modular(decoder, tok) -> ModularLM:
    return ModularLM(decoder, plan_vocab(49152, 49152, tok).placeholder_ids)


def _sensor(hidden: int):
    cfg = plugin_config("sensor", conf_dir=TOY_CONF, hidden_size=hidden)
    return instantiate_plugin(cfg)


def _batch(tok, n_tokens: int):
    text = "Reading: " + "<|modality_0|>" * n_tokens + " means the phone fell."
    ids = tok([text, text], return_tensors="pt").input_ids
    return ids, torch.randn(2, 8)


def test_new_plugin_is_exact_noop_on_logits(micro_decoder, student_tok):
    model = _modular(micro_decoder, student_tok)
    ids, sensor = _batch(student_tok, 4)
    before = model(ids).logits
    model.add_plugin(_sensor(32))
    after = model(ids, modality_inputs={"sensor": sensor}).logits
    assert torch.equal(before, after)
    assert torch.equal(model.last_gates["sensor"], torch.zeros(2))


def test_open_gate_changes_only_what_follows_placeholders(micro_decoder, student_tok):
    model = _modular(micro_decoder, student_tok)
    ids, sensor = _batch(student_tok, 4)
    plugin = model.add_plugin(_sensor(32))
    with torch.no_grad():
        plugin.gate.proj.bias.fill_(2.0)
    base = model(ids).logits
    fused = model(ids, modality_inputs={"sensor": sensor}).logits
    first = int((ids[0] == student_tok.convert_tokens_to_ids("<|modality_0|>")).nonzero()[0])
    assert torch.equal(base[:, :first], fused[:, :first])  # causal: nothing before the modality moves
    assert not torch.allclose(base[:, first:], fused[:, first:])
    assert torch.allclose(model.last_gates["sensor"], torch.tanh(torch.tensor(2.0)).expand(2))


def test_text_only_forward_never_builds_an_encoder(micro_decoder, student_tok, tmp_path):
    model = _modular(micro_decoder, student_tok)
    built = []
    model.register_plugin("sensor", lambda: built.append(1) or _sensor(32))
    ids, sensor = _batch(student_tok, 4)
    model(ids)
    model(ids[:1], use_cache=True)
    assert built == [] and len(model.plugins) == 0
    model(ids, modality_inputs={"sensor": sensor})
    assert built == [1] and "sensor" in model.plugins


def test_plugin_weights_load_from_their_own_dir_on_first_use(micro_decoder, student_tok, tmp_path, caplog):
    trained = _sensor(32)
    with torch.no_grad():
        trained.gate.proj.bias.fill_(1.0)
    save_plugin(trained, tmp_path / "sensor", decoder_fingerprint="abc")
    model = _modular(micro_decoder, student_tok)
    with caplog.at_level(logging.INFO):
        assert model.register_plugin_dir(tmp_path / "sensor", fingerprint="abc") == "sensor"
        assert len(model.plugins) == 0
        ids, sensor = _batch(student_tok, 4)
        model(ids, modality_inputs={"sensor": sensor})
    assert "plugin sensor loaded on cpu" in caplog.text
    assert torch.equal(model.plugins["sensor"].gate.proj.bias, trained.gate.proj.bias)


def test_third_modality_by_config_alone_trains_with_decoder_untouched(micro_decoder, student_tok):
    """A class outside the package + a yaml: fused and trained, decoder and other plugins bit-identical."""
    model = _modular(micro_decoder, student_tok)
    plugin = model.add_plugin(_sensor(32))
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    counts = freeze({"decoder": model.decoder, "sensor": plugin}, {"decoder": False, "sensor": True})
    assert counts["decoder"][0] == 0 and counts["sensor"][0] == counts["sensor"][1] > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, sensor = _batch(student_tok, 4)
    labels = ids.clone()
    losses = []
    for _ in range(5):
        loss = model(ids, modality_inputs={"sensor": sensor}, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert float(model.last_gates["sensor"].abs().min()) > 0  # the gate opened
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k]), k


def test_unknown_plugin_lists_available_ones():
    with pytest.raises(UnknownPluginError, match="available: speech, vision"):
        plugin_config("lidar")


def test_plugin_with_unreserved_placeholder_is_refused(micro_decoder, student_tok):
    model = _modular(micro_decoder, student_tok)
    cfg = plugin_config("sensor", conf_dir=TOY_CONF, hidden_size=32)
    cfg.placeholder = "<|not_reserved|>"
    with pytest.raises(ValueError, match="not a token of this decoder"):
        model.add_plugin(instantiate_plugin(cfg))


def test_freeze_requires_a_flag_for_every_component(micro_decoder):
    with pytest.raises(ValueError, match="flags missing"):
        freeze({"decoder": micro_decoder, "other": torch.nn.Linear(2, 2)}, {"decoder": False})


def test_wrong_token_count_is_a_clear_error(micro_decoder, student_tok):
    model = _modular(micro_decoder, student_tok)
    model.add_plugin(_sensor(32))
    ids, sensor = _batch(student_tok, 3)
    with pytest.raises(ValueError, match="exactly 4"):
        model(ids, modality_inputs={"sensor": sensor})


def test_sensor_yaml_is_plain_config():
    cfg = OmegaConf.load(TOY_CONF / "sensor.yaml")
    assert cfg._target_ == "tests.toy.sensor.SensorPlugin"
