"""recipe=add_modality end to end on tiny shapes: frozen decoder, plugin artifact, held-out eval, resume, parity."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from autoglm_train.data.multimodal.datamodule import PairDataModule
from autoglm_train.data.multimodal.digits import HandwrittenDigits
from autoglm_train.data.multimodal.spec import PairDataSpec
from autoglm_train.engine.engine import Engine
from autoglm_train.eval.generation import bare_decoder_tokens, text_only_tokens
from autoglm_train.eval.text_metrics import cer, digit_accuracy, exact_match, wer
from autoglm_train.model.decoder_dir import load_decoder_dir, placeholder_ids
from autoglm_train.model.freeze import freeze
from autoglm_train.model.manifest import ARTIFACT_FILES, load_plugin_artifact, save_plugin_artifact
from autoglm_train.model.modular import ModularLM
from autoglm_train.model.pin import PluginMismatchError, pin_decoder
from autoglm_train.model.plugins.vision import VisionPlugin
from autoglm_train.model.registry import instantiate_plugin, plugin_config
from autoglm_train.tasks.plugin_task import PluginTask
from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO
from recipes import add_modality
from tests.conftest import REPO
from tests.mm_fixtures import DIGITS, TINY_RUN, TINY_VISION, save_micro_decoder


@pytest.fixture(scope="module")
def decoder_dir(student_tok, tmp_path_factory) -> Path:
    return save_micro_decoder(tmp_path_factory.mktemp("decoder") / "student", student_tok)


def _cfg(root: Path, decoder: Path, *overrides: str, plugin: list[str] = TINY_VISION, data: list[str] = DIGITS):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "recipe=add_modality",
                f"paths.root_dir={root}",
                f"decoder={decoder}",
                *plugin,
                *data,
                *TINY_RUN,
                *overrides,
            ],
        )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "heldout_outputs.jsonl").read_text().splitlines()]


def _heldout(out: Path, summary: dict) -> tuple[list[str], list[str]]:
    """(references, greedy outputs) of the held-out items as the run wrote them, in the reported content order."""
    rows = _rows(out)
    assert len(rows) == summary["test/items"]
    return [r["answer"] for r in rows], [r[f"output_{summary['heldout_order']}"] for r in rows]


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def vision_run(decoder_dir, student_tok, tmp_path_factory):
    """One tiny recipe run, next to an already trained speech-slot plugin that must stay untouched."""
    root = tmp_path_factory.mktemp("run")
    other = instantiate_plugin(plugin_config("sensor", conf_dir=REPO / "tests" / "toy", hidden_size=32))
    other_dir = save_plugin_artifact(
        other, root / "others" / "sensor", pin_decoder(decoder_dir, placeholder_ids(student_tok))
    )
    before = {"decoder": _hashes(decoder_dir), "other": _hashes(other_dir)}
    cfg = _cfg(root, decoder_dir)
    summary = add_modality.run(cfg)
    return {"root": root, "cfg": cfg, "summary": summary, "before": before, "other": other_dir}


def test_run_saves_a_pinned_artifact_and_reports_heldout_metrics(vision_run):
    summary, out = vision_run["summary"], Path(vision_run["cfg"].paths.output_dir)
    artifact = Path(summary["artifact"])
    assert artifact == out / "plugins" / "vision" and out == vision_run["root"] / "outputs" / "add_modality" / "vision"
    assert sorted(p.name for p in artifact.iterdir()) == sorted(ARTIFACT_FILES)
    saved = json.loads((out / "run_summary.json").read_text())
    answers, outputs = _heldout(out, saved)
    assert saved["test/digit_accuracy"] == digit_accuracy([r["label"] for r in _rows(out)], outputs)
    assert saved["test/wer"] == wer(answers, outputs) and saved["test/cer"] == cer(answers, outputs)
    assert saved["test/accuracy"] == exact_match(answers, outputs)
    assert 0 < abs(saved["test/gate_vision"]) < 1  # the zero-initialised tanh gate has moved, and stays bounded
    assert math.isfinite(saved["val/loss"]) and saved["val/loss"] > 0
    assert saved["test/items"] == 8 and saved["global_step"] == 3 and saved["stage"] == "full"
    assert saved["eval_max_new_tokens"] == 1  # digit words are one token: the budget is the longest answer
    assert saved["decoder_verified_unchanged"] and saved["text_only_unchanged"]
    assert saved["params"]["decoder"]["trainable"] == 0 < saved["params"]["decoder"]["total"]
    assert saved["params"]["encoder"]["trainable"] == saved["params"]["encoder"]["total"] > 0
    assert saved["data_report"]["splits"] == {"train": 69, "val": 3, "test": 8}
    assert (
        json.loads((artifact / "manifest.json").read_text())["decoder"]["fingerprint"] == saved["decoder_fingerprint"]
    )


def test_decoder_dir_and_other_plugins_are_untouched(vision_run, decoder_dir):
    assert _hashes(decoder_dir) == vision_run["before"]["decoder"]
    assert _hashes(vision_run["other"]) == vision_run["before"]["other"]


def test_checkpoints_hold_the_plugin_only_and_resume(vision_run, decoder_dir):
    out = Path(vision_run["cfg"].paths.output_dir)
    ckpt = SafetensorsCheckpointIO().load_checkpoint(out / "checkpoints" / "step=000002.ckpt")
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("model.plugins.vision.") for k in keys)
    assert ckpt["plugin"] == "vision" and len(ckpt["decoder_id"]) == 64
    resumed = add_modality.run(_cfg(vision_run["root"], decoder_dir, "trainer.max_steps=4"))
    assert resumed["resumed_from"].endswith(".ckpt") and resumed["global_step"] == 4


def test_resuming_against_another_decoder_is_refused(vision_run, student_tok, tmp_path):
    other = save_micro_decoder(tmp_path / "other", student_tok, seed=5)
    with pytest.raises(ValueError, match="not plugin 'vision' on decoder"):
        add_modality.run(_cfg(vision_run["root"], other, "trainer.max_steps=5"))


def test_resuming_with_a_changed_plugin_is_refused(vision_run, decoder_dir):
    with pytest.raises(ValueError, match="plugin differs"):
        add_modality.run(
            _cfg(vision_run["root"], decoder_dir, "plugin.encoder_intermediate_size=32", "trainer.max_steps=5")
        )


def test_artifact_refuses_another_decoder(vision_run, student_tok, tmp_path):
    other = save_micro_decoder(tmp_path / "other", student_tok, seed=0, num_hidden_layers=1)
    with pytest.raises(PluginMismatchError, match=r"config\.json"):
        load_plugin_artifact(vision_run["summary"]["artifact"], pin_decoder(other, placeholder_ids(student_tok)))


def test_alignment_stage_keeps_the_encoder_of_init_plugin(vision_run, decoder_dir, tmp_path):
    init = vision_run["summary"]["artifact"]
    summary = add_modality.run(
        _cfg(tmp_path, decoder_dir, "recipe.stage=alignment", f"recipe.init_plugin={init}", "trainer.max_steps=2")
    )
    assert summary["params"]["encoder"]["trainable"] == 0
    before, after = (
        load_file(Path(init) / "model.safetensors"),
        load_file(Path(summary["artifact"]) / "model.safetensors"),
    )
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("projector."))


def _engine_with(plugin, decoder, tok) -> Engine:
    engine = Engine.in_process(decoder, tok, {plugin.name: plugin})
    image = torch.randn(1, 3, 16, 16)
    ids = tok("<|image|>" * 4 + " What digit is this?", return_tensors="pt").input_ids
    engine.model(ids, modality_inputs={plugin.name: image})  # the plugin is used in between, its gate open
    assert float(plugin.gate(plugin.encode(image)).abs().max()) > 0
    return engine


PARITY_PROMPTS = ["To be, or not to be", "Seven and"]


def test_text_only_generation_through_the_engine_equals_the_bare_decoder(vision_run, decoder_dir):
    """With the plugin built and on the fusion path, the engine's text-only greedy tokens are the bare decoder's."""
    decoder, tok = load_decoder_dir(decoder_dir)
    before = bare_decoder_tokens(decoder, tok, PARITY_PROMPTS, max_new_tokens=6)
    plugin = load_plugin_artifact(vision_run["summary"]["artifact"], pin_decoder(decoder_dir, placeholder_ids(tok)))
    engine = _engine_with(plugin, decoder, tok)
    assert "vision" in engine.model.plugins
    assert text_only_tokens(engine, PARITY_PROMPTS, max_new_tokens=6) == before


class LeakyVision(VisionPlugin):
    """A broken fusion: besides its placeholders it writes into every position (here: shifts the text by one)."""

    def fuse(self, token_embeds, input_ids, placeholder_id, inputs):
        out, gates = super().fuse(token_embeds, input_ids, placeholder_id, inputs)
        return out.roll(1, dims=1), gates


def test_text_only_check_fails_when_a_plugin_writes_outside_its_placeholders(vision_run, decoder_dir):
    decoder, tok = load_decoder_dir(decoder_dir)
    before = bare_decoder_tokens(decoder, tok, PARITY_PROMPTS, max_new_tokens=6)
    good = load_plugin_artifact(vision_run["summary"]["artifact"], pin_decoder(decoder_dir, placeholder_ids(tok)))
    leaky = LeakyVision(**good.config())
    leaky.load_state_dict(good.state_dict())
    engine = _engine_with(leaky, decoder, tok)
    assert text_only_tokens(engine, PARITY_PROMPTS, max_new_tokens=6) != before


def test_frozen_decoder_is_bit_identical_after_fit(decoder_dir, student_tok, tmp_path):
    """The task refuses trainable decoder params, and a real fit leaves every decoder tensor unchanged."""
    import lightning as L

    decoder, tok = load_decoder_dir(decoder_dir)
    model = ModularLM(decoder, placeholder_ids(tok))
    cfg = plugin_config("vision", hidden_size=32, image_size=16, patch_size=4, num_tokens=4, encoder_hidden_size=32,
                        encoder_layers=1, encoder_heads=2, encoder_intermediate_size=64)  # fmt: skip
    plugin = model.add_plugin(instantiate_plugin(cfg))
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
    decoder.requires_grad_(True)
    with pytest.raises(RuntimeError, match="plugin 'vision' only"):
        PluginTask(model, "vision", tok, optimizer, None, "fp")  # the decoder is not frozen
    freeze({"decoder": decoder, "vision": plugin}, {"decoder": False, "vision": True})
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    gate_before = plugin.gate.proj.weight.clone()
    spec = PairDataSpec(HandwrittenDigits("sklearn", max_items=48), val_fraction=0.0, test_fraction=0.1, batch_size=8)
    data = PairDataModule(spec, plugin, tok)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(PluginTask(model, "vision", tok, optimizer, None, "fp"), datamodule=data)
    assert trainer.global_step == 3 and not torch.equal(plugin.gate.proj.weight, gate_before)
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_recipe_config_defaults_and_plugin_override():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        vision = compose(config_name="train", overrides=["recipe=add_modality"])
        speech = compose(config_name="train", overrides=["recipe=add_modality", "plugin=speech"])
    assert vision.plugin.name == "vision" and vision.data_mm.source.dataset == "mnist"
    assert speech.plugin.name == "speech" and speech.data_mm.source._target_.endswith("SpokenDigits")
    assert vision.recipe.module == "recipes.add_modality" and vision.decoder.endswith("outputs/distill/student")
    assert speech.paths.output_dir.endswith("outputs/add_modality/speech")


def test_missing_decoder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe=distill"):
        add_modality.run(_cfg(tmp_path, tmp_path / "nope"))


@pytest.mark.slow
def test_int8_decoder_run(decoder_dir, tmp_path):
    summary = add_modality.run(_cfg(tmp_path, decoder_dir, "recipe.decoder_int8=true", "trainer.max_steps=2"))
    assert summary["decoder_int8"] and summary["decoder_verified_unchanged"] and summary["global_step"] == 2


@pytest.mark.slow
def test_speech_run_on_synthesized_digits(decoder_dir, tmp_path):
    tiny_speech = ["plugin=speech", "plugin.num_tokens=4", "plugin.num_mel_bins=32", "plugin.encoder_hidden_size=32",
                   "plugin.encoder_layers=1", "plugin.encoder_heads=2", "plugin.encoder_intermediate_size=64",
                   "plugin.subsampling_conv_channels=16"]  # fmt: skip
    espeak = ["data_mm=espeak", "data_mm.source.num_utterances=60"]
    summary = add_modality.run(_cfg(tmp_path, decoder_dir, "trainer.max_steps=2", plugin=tiny_speech, data=espeak))
    assert summary["plugin"] == "speech" and "test/digit_accuracy" not in summary
    answers, outputs = _heldout(Path(summary["artifact"]).parents[1], summary)
    assert summary["test/cer"] == cer(answers, outputs) and summary["test/wer"] == wer(answers, outputs)
    assert summary["data_report"]["notes"] == {"resampled 22050 -> 16000 Hz": 60}
