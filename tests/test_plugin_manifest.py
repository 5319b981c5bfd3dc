"""The plugin artifact pins its decoder: same decoder loads, any other one is refused with what differs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from autoglm_train.model.decoder_dir import placeholder_ids
from autoglm_train.model.manifest import (
    ARTIFACT_FILES,
    MANIFEST_FILE,
    load_plugin_artifact,
    read_manifest,
    save_plugin_artifact,
)
from autoglm_train.model.modular import ModularLM
from autoglm_train.model.pin import PluginMismatchError, pin_decoder
from autoglm_train.model.registry import instantiate_plugin, plugin_config
from tests.conftest import REPO
from tests.mm_fixtures import save_micro_decoder


@pytest.fixture(scope="module")
def decoders(student_tok, tmp_path_factory):
    """One real micro decoder dir, plus copies that differ in one way each (no second model build)."""
    root = tmp_path_factory.mktemp("decoders")
    a = save_micro_decoder(root / "a", student_tok)
    deeper = shutil.copytree(a, root / "deeper")
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    retrained = shutil.copytree(a, root / "retrained")
    weights = load_file(retrained / "model.safetensors")
    save_file(
        {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, retrained / "model.safetensors"
    )
    return {"a": a, "deeper": deeper, "retrained": retrained}


def _pin(directory, tok):
    return pin_decoder(directory, placeholder_ids(tok))


def _trained_sensor():
    plugin = instantiate_plugin(plugin_config("sensor", conf_dir=REPO / "tests" / "toy", hidden_size=32))
    with torch.no_grad():
        plugin.gate.proj.bias.fill_(0.5)
    return plugin


def test_artifact_has_exactly_weights_config_manifest(decoders, student_tok, tmp_path):
    pin = _pin(decoders["a"], student_tok)
    artifact = save_plugin_artifact(_trained_sensor(), tmp_path / "plugins" / "sensor", pin, extra={"stage": "full"})
    assert sorted(p.name for p in artifact.iterdir()) == sorted(ARTIFACT_FILES)
    manifest = read_manifest(artifact)
    assert manifest["decoder"]["fingerprint"] == pin.fingerprint
    assert manifest["decoder"]["placeholder_ids"]["<|modality_0|>"] == student_tok.convert_tokens_to_ids(
        "<|modality_0|>"
    )
    assert manifest["stage"] == "full" and set(manifest["files"]) == {"plugin.json", "model.safetensors"}
    assert not list(tmp_path.glob("plugins/.*"))  # no staging directory left behind


def test_same_decoder_loads_and_works_through_register_plugin_dir(decoders, student_tok, micro_decoder, tmp_path):
    pin = _pin(decoders["a"], student_tok)
    trained = _trained_sensor()
    artifact = save_plugin_artifact(trained, tmp_path / "sensor", pin)
    loaded = load_plugin_artifact(artifact, _pin(decoders["a"], student_tok))
    assert torch.equal(loaded.gate.proj.bias, trained.gate.proj.bias)
    model = ModularLM(micro_decoder, placeholder_ids(student_tok))
    assert model.register_plugin_dir(artifact, fingerprint=pin.fingerprint) == "sensor"
    assert torch.equal(model.plugin("sensor").gate.proj.bias, trained.gate.proj.bias)


@pytest.mark.parametrize(
    ("other", "message"),
    [("deeper", r"config\.json"), ("retrained", "weights")],
)
def test_another_decoder_is_refused_naming_what_differs(decoders, student_tok, tmp_path, other, message):
    artifact = save_plugin_artifact(_trained_sensor(), tmp_path / "sensor", _pin(decoders["a"], student_tok))
    with pytest.raises(PluginMismatchError, match=message) as err:
        load_plugin_artifact(artifact, _pin(decoders[other], student_tok))
    assert "recipe=add_modality" in str(err.value)


def test_retrained_decoder_loads_when_weights_check_is_off(decoders, student_tok, tmp_path):
    trained = _trained_sensor()
    artifact = save_plugin_artifact(trained, tmp_path / "sensor", _pin(decoders["a"], student_tok))
    loaded = load_plugin_artifact(artifact, _pin(decoders["retrained"], student_tok), check_weights=False)
    assert loaded.name == "sensor" and loaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())  # the trained weights
    with pytest.raises(PluginMismatchError, match=r"config\.json"):  # only the weights check is off
        load_plugin_artifact(artifact, _pin(decoders["deeper"], student_tok), check_weights=False)


def test_tokenizer_or_placeholder_change_is_refused(decoders, student_tok, tmp_path):
    pin = _pin(decoders["a"], student_tok)
    artifact = save_plugin_artifact(_trained_sensor(), tmp_path / "sensor", pin)
    moved = {**pin.placeholder_ids, "<|modality_0|>": 7}
    with pytest.raises(PluginMismatchError, match="placeholder token ids"):
        load_plugin_artifact(artifact, pin_decoder(decoders["a"], moved))
    edited = tmp_path / "edited"
    shutil.copytree(decoders["a"], edited)
    tok_json = json.loads((edited / "tokenizer.json").read_text())
    tok_json["added_tokens"].append({**tok_json["added_tokens"][-1], "id": 99999, "content": "<|new|>"})
    (edited / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(PluginMismatchError, match="tokenizer files"):
        load_plugin_artifact(artifact, _pin(edited, student_tok))


def test_pin_ignores_where_and_with_what_a_file_was_written(decoders, student_tok, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(decoders["a"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (copy / "config.json").write_text(json.dumps(config, indent=7))
    assert _pin(copy, student_tok).fingerprint == _pin(decoders["a"], student_tok).fingerprint


def test_modified_artifact_file_is_detected(decoders, student_tok, tmp_path):
    pin = _pin(decoders["a"], student_tok)
    artifact = save_plugin_artifact(_trained_sensor(), tmp_path / "sensor", pin)
    meta = json.loads((artifact / "plugin.json").read_text())
    (artifact / "plugin.json").write_text(json.dumps({**meta, "num_tokens": 5}))
    with pytest.raises(ValueError, match="modified"):
        load_plugin_artifact(artifact, pin)
    (artifact / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_plugin_artifact(artifact, pin)


def test_serving_checks_the_pinned_weights_not_only_the_shapes(decoders, student_tok, tmp_path):
    """The engine's start-up check reads the artifact's full pin: a retrained decoder of the same shape is refused
    with the same message every other pin check gives (one check_pin); plugin.json's fingerprint alone would pass."""
    from autoglm_train.engine.bundle import BundleInfo
    from autoglm_train.engine.loading import check_plugin_pins
    from autoglm_train.model.plugin_io import read_plugin_meta

    artifact = save_plugin_artifact(_trained_sensor(), tmp_path / "sensor", _pin(decoders["a"], student_tok))
    meta = read_plugin_meta(artifact)

    def bundle(decoder: str, folder=artifact, manifest=None) -> BundleInfo:
        return BundleInfo(decoders[decoder], decoders[decoder], {"sensor": folder}, {"sensor": meta}, manifest)

    check_plugin_pins(bundle("a"), student_tok)
    with pytest.raises(PluginMismatchError, match=r"^plugin sensor .*weights .*recipe=add_modality"):
        check_plugin_pins(bundle("retrained"), student_tok)
    bare = shutil.copytree(artifact, tmp_path / "bare", ignore=shutil.ignore_patterns(MANIFEST_FILE))
    check_plugin_pins(bundle("retrained", bare), student_tok)  # only the fingerprint recorded: shapes match
    with pytest.raises(PluginMismatchError, match=r"config\.json, tokenizer files or placeholder"):
        check_plugin_pins(bundle("deeper", bare), student_tok)
    # an exported bundle's manifest pins the decoder as the bundle ships it (dtype-converted): that pin wins
    shipped = {"modules": {"plugins": {"sensor": {"decoder_pin": _pin(decoders["retrained"], student_tok).to_dict()}}}}
    check_plugin_pins(bundle("retrained", manifest=shipped), student_tok)
    with pytest.raises(PluginMismatchError, match="weights"):
        check_plugin_pins(bundle("a", manifest=shipped), student_tok)
