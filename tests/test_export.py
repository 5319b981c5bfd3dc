"""Serving bundles: a trained micro GLM exported to every form, each reloaded by its real consumer.

One module-scoped bundle (bf16 HF + int8 + GGUF f16/q8_0 + a plugin) is exported with parity
verification on; the other tests read it, copy it to corrupt it, or export small variants. The
ONNX form (torch.onnx's dynamo export costs ~10 s) and fp16 are covered by one slow test that
drives both command lines: ``make test-all`` runs it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from autoglm_train.export.bundle import ExportOptions, export_bundle
from autoglm_train.export.manifest import MANIFEST, BundleError, BundleIntegrityError, check_files, sha256_file
from tests.conftest import micro_spec

SENTENCE = "The quick brown fox jumps over the lazy dog. "
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install llama-cpp-python; compiles ~6 min)"
NO_ONNX = "onnx/onnxscript/onnxruntime not installed (pip install 'autoglm-train[export]')"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, student_tok) -> Path:
    """A micro GLM trained a few AdamW steps on one sentence, so its greedy continuations are decisive."""
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.model.hf_io import save_hf_decoder

    torch.manual_seed(0)
    model = build_decoder(micro_spec(), len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id)
    ids = torch.tensor([student_tok(SENTENCE * 2)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return save_hf_decoder(model.eval(), student_tok, tmp_path_factory.mktemp("run") / "student")


@pytest.fixture(scope="module")
def sensor_dir(tmp_path_factory, student_dir, student_tok) -> Path:
    """A plugin artifact pinned to ``student_dir`` (the export refuses one trained against another decoder)."""
    from autoglm_train.model.decoder_dir import placeholder_ids
    from autoglm_train.model.pin import pin_decoder
    from autoglm_train.model.plugin_io import save_plugin
    from tests.toy.sensor import SensorPlugin

    torch.manual_seed(1)
    pin = pin_decoder(student_dir, placeholder_ids(student_tok))
    plugin = SensorPlugin("sensor", hidden_size=32, placeholder="<|modality_0|>", num_tokens=4)
    folder = save_plugin(plugin, tmp_path_factory.mktemp("plugins") / "sensor", decoder_fingerprint=pin.fingerprint)
    # recipe=add_modality artifacts also carry their own manifest.json (decoder pin); it must travel along.
    artifact = {"format": "autoglm-train/plugin", "plugin": "sensor", "decoder": pin.to_dict()}
    (folder / "manifest.json").write_text(json.dumps(artifact))
    (folder / "notes.txt").write_text("not part of the artifact")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student_dir, sensor_dir):
    """``(bundle path, VerifyReport)`` of the full export, verified at export time."""
    out = tmp_path_factory.mktemp("bundles") / "micro-bundle"
    opts = ExportOptions(decoder=str(student_dir), out=str(out), plugins=[str(sensor_dir)], onnx=False, progress=False)
    return export_bundle(opts)


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def manifest(bundle) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


# --- layout and manifest ---------------------------------------------------------------


def test_bundle_holds_exactly_the_expected_files(bundle):
    expected = {
        "manifest.json",
        "decoder/config.json",
        "decoder/generation_config.json",
        "decoder/model.safetensors",
        "decoder/tokenizer.json",
        "decoder/tokenizer_config.json",
        "decoder/chat_template.jinja",
        "int8/config.json",
        "int8/generation_config.json",
        "int8/model.safetensors",
        "int8/tokenizer.json",
        "int8/tokenizer_config.json",
        "int8/chat_template.jinja",
        "gguf/model-f16.gguf",
        "gguf/model-q8_0.gguf",
        "plugins/sensor/plugin.json",
        "plugins/sensor/model.safetensors",
        "plugins/sensor/manifest.json",
    }
    assert _files(bundle) == expected
    assert not list(bundle.parent.glob(".*partial")), "the temporary export directory was left behind"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_nothing_pickled(bundle):
    allowed = {".json", ".jinja", ".safetensors", ".gguf", ".onnx", ".data"}
    for path in (p for p in bundle.rglob("*") if p.is_file()):
        assert path.suffix in allowed, path
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle / torch.save zip"


def test_manifest_describes_every_module_and_form(bundle, manifest):
    assert manifest["format"] == "autoglm-bundle" and manifest["model_name"] == "micro-bundle"
    forms = manifest["forms"]
    assert forms["hf"]["dtype"] == "bfloat16" and forms["hf"]["architecture"] == "GlmForCausalLM"
    assert forms["hf"]["vllm_compatible"] is True
    assert forms["int8"]["dtype"] == "int8" and forms["int8"]["format"] == "huggingface-torchao"
    assert forms["int8"]["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"
    assert (forms["gguf_f16"]["dtype"], forms["gguf_q8_0"]["dtype"]) == ("float16", "q8_0")
    assert forms["gguf_f16"]["architecture"] == "chatglm"
    assert manifest["chat_template"]["thinking"] is True
    assert {"torch", "transformers", "safetensors", "gguf", "python"} <= set(manifest["versions"])
    sensor = manifest["modules"]["plugins"]["sensor"]
    assert sensor["placeholder"] == "<|modality_0|>" and sensor["dtype"] == ["F32"] and sensor["params"] > 0
    assert manifest["modules"]["decoder"]["hidden_size"] == 32
    files = manifest["files"]
    assert MANIFEST not in files
    assert files["decoder/model.safetensors"]["sha256"] == sha256_file(bundle / "decoder/model.safetensors")
    assert "plugins/sensor/manifest.json" in files  # only the bundle's own manifest is left out
    assert manifest["parity"]["passed"] is True


# --- parity through the real consumers -----------------------------------------------


def test_plugins_are_pinned_to_the_decoder_the_bundle_ships(bundle, manifest, student_tok):
    """The export checked the plugin against the source decoder; it records the bundled (bf16) decoder's pin,
    weights digest included, which the server checks at start-up (engine.loading.check_plugin_pins)."""
    from autoglm_train.engine.bundle import read_bundle
    from autoglm_train.engine.loading import check_plugin_pins, plugin_pins
    from autoglm_train.model.decoder_dir import placeholder_ids
    from autoglm_train.model.pin import pin_decoder

    shipped = pin_decoder(bundle / "decoder", placeholder_ids(student_tok))
    recorded = manifest["modules"]["plugins"]["sensor"]["decoder_pin"]
    assert recorded["weights_sha256"] == shipped.weights_sha256 and recorded["fingerprint"] == shipped.fingerprint
    assert plugin_pins(read_bundle(bundle))["sensor"].weights_sha256 == shipped.weights_sha256
    check_plugin_pins(read_bundle(bundle), student_tok)


def test_every_form_matches_the_training_model(exported):
    _, report = exported
    print("\n" + report.table())
    checked = {f.form for f in report.forms}
    assert {"hf", "int8"} <= checked
    assert report.passed, report.failures()
    for form in report.forms:
        assert form.decisive_top1_agreement == 1.0, form
    by_form = {f.form: f for f in report.forms}
    assert by_form["hf"].max_rel_logit_diff < 5e-2
    assert by_form["int8"].max_rel_logit_diff < 1e-1
    assert by_form["int8"].consumer == "transformers (TorchAoConfig int8)"  # parity through plain transformers


def test_trained_prompt_continues_identically_in_every_form(exported):
    """On the sentence the model learned, every form's greedy continuation is the reference's, token for token."""
    from autoglm_train.export.parity import PROMPTS

    assert PROMPTS[0] == "The quick brown fox"
    _, report = exported
    for form in report.forms:
        assert form.greedy_identical_per_prompt[0], (form.form, form.notes)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_gguf_forms_run_in_llama_cpp(exported, bundle):
    """llama.cpp (through llama-cpp-python) loads both GGUF files, reads the HF hyper-parameters and chat
    template from them, and completes the learned sentence."""
    from llama_cpp import Llama

    _, report = exported
    by_form = {f.form: f for f in report.forms}
    assert by_form["gguf_f16"].passed and by_form["gguf_q8_0"].passed  # includes: tokenizes like HF
    assert by_form["gguf_f16"].max_rel_logit_diff < 1e-2
    for name, ftype in (("model-f16.gguf", "1"), ("model-q8_0.gguf", "7")):
        llm = Llama(model_path=str(bundle / "gguf" / name), n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
        meta = llm.metadata
        assert meta["general.architecture"] == "chatglm" and meta["general.file_type"] == ftype
        assert meta["chatglm.context_length"] == "256" and meta["chatglm.block_count"] == "2"
        assert meta["chatglm.rope.dimension_count"] == "4"  # head_dim 8 x partial_rotary_factor 0.5
        assert float(meta["chatglm.attention.layer_norm_rms_epsilon"]) == pytest.approx(1e-5)
        assert meta["tokenizer.ggml.pre"] == "smollm" and "enable_thinking" in meta["tokenizer.chat_template"]
        text = llm.create_completion("The quick brown", max_tokens=6, temperature=0.0)["choices"][0]["text"]
        llm.close()
        assert text.startswith(" fox jumps over the lazy"), (name, text)


# --- the HF decoder, chat template, int8 and plugins ---------------------------------


def test_hf_decoder_is_plain_transformers(bundle):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(bundle / "decoder")
    assert not getattr(config, "auto_map", None)
    model = AutoModelForCausalLM.from_pretrained(bundle / "decoder", dtype="auto")
    assert type(model).__module__.startswith("transformers.models.glm.")
    assert model.dtype == torch.bfloat16


def test_hf_decoder_keeps_the_source_config_and_tokenizer(bundle, student_dir):
    """Only dtype-like keys may change: plugin artifacts pin the decoder by its config and tokenizer files."""
    volatile = {"dtype", "torch_dtype", "transformers_version", "local_files_only", "is_local", "_name_or_path"}
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        src, out = (json.loads((d / name).read_text()) for d in (student_dir, bundle / "decoder"))
        assert {k: v for k, v in out.items() if k not in volatile} == {
            k: v for k, v in src.items() if k not in volatile
        }
    assert (bundle / "decoder/tokenizer.json").read_bytes() == (student_dir / "tokenizer.json").read_bytes()


def test_chat_template_switches_thinking(bundle, student_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle / "decoder")
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>greet back</think>\n\nhello"},
        {"role": "user", "content": "2+2?"},
    ]
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n") and on == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert "greet back" not in on and "<|im_start|>assistant\nhello<|im_end|>" in on  # old reasoning dropped
    assert len(tok) == len(student_tok)  # think tags are text, not new token ids


def test_int8_form_loads_in_plain_transformers_and_stays_int8(bundle, student_dir):
    """``from_pretrained(int8/)`` alone (torchao's quantization_config): int8 weights in memory, one tied vocab."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoglm_train.export.hf_dir import load_reference
    from autoglm_train.quant.int8_layout import load_int8
    from autoglm_train.quant.size import weight_bytes

    with safe_open(str(bundle / "int8/model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj._weight_qdata").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.down_proj._weight_scale").shape == (32, 1)
        assert f.get_tensor("model.embed_tokens._weight_qdata").dtype == torch.int8
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - the tied head is stored once
    config = json.loads((bundle / "int8/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    model = AutoModelForCausalLM.from_pretrained(bundle / "int8")
    assert type(model).__module__.startswith("transformers.models.glm.")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head stays tied
    int8 = {n for n, p in model.named_parameters() if getattr(p, "qdata", None) is not None}
    assert "model.embed_tokens.weight" in int8 and "model.layers.1.self_attn.o_proj.weight" in int8
    assert all(p.qdata.dtype == torch.int8 for n, p in model.named_parameters() if n in int8)
    reference = load_reference(student_dir)
    assert weight_bytes(model) <= 0.5 * weight_bytes(reference)
    ids = torch.tensor([[504, 2365, 6354, 16438]])
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
        again = load_int8(bundle / "int8", kernel="torchao")(input_ids=ids).logits  # as PTQ measures it
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(got, again)
    tok = AutoTokenizer.from_pretrained(bundle / "int8")
    assert tok.chat_template == AutoTokenizer.from_pretrained(bundle / "decoder").chat_template


def test_plugins_are_shipped_bit_identical_and_load(bundle, exported, sensor_dir):
    from autoglm_train.model.plugin_io import load_plugin

    for name in ("plugin.json", "model.safetensors", "manifest.json"):
        assert (bundle / "plugins/sensor" / name).read_bytes() == (sensor_dir / name).read_bytes()
    assert exported[1].plugins["sensor"]["ok"], exported[1].plugins
    assert type(load_plugin(bundle / "plugins/sensor")).__name__ == "SensorPlugin"


# --- integrity, overwrite, atomicity --------------------------------------------------


def test_corrupted_edited_missing_and_extra_files_are_named(bundle, tmp_path, capsys):
    from autoglm_train.export.cli import verify_main

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    assert check_files(copy) == len(json.loads((copy / MANIFEST).read_text())["files"])
    assert verify_main([str(copy), "--checksums-only"]) == 0

    blob = bytearray((copy / "gguf/model-q8_0.gguf").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte, same size
    (copy / "gguf/model-q8_0.gguf").write_bytes(bytes(blob))
    config = json.loads((copy / "decoder/config.json").read_text())
    (copy / "decoder/config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}, indent=2))
    (copy / "int8/generation_config.json").unlink()
    (copy / "decoder/notes.txt").write_text("hand edit")

    with pytest.raises(BundleIntegrityError) as err:
        check_files(copy)
    problems = dict(p.split(": ", 1) for p in err.value.problems)
    assert set(problems) == {
        "gguf/model-q8_0.gguf",
        "decoder/config.json",
        "int8/generation_config.json",
        "decoder/notes.txt",
    }
    assert "does not match" in problems["gguf/model-q8_0.gguf"]
    assert "missing" in problems["int8/generation_config.json"] and "unexpected" in problems["decoder/notes.txt"]

    assert verify_main([str(copy), "--quiet"]) == 1  # checksums fail before any model is loaded
    assert "gguf/model-q8_0.gguf" in capsys.readouterr().err


def test_an_existing_bundle_is_never_overwritten_silently(bundle, student_dir):
    before = sha256_file(bundle / MANIFEST)
    with pytest.raises(BundleError, match="already exists; pass --overwrite"):
        export_bundle(ExportOptions(decoder=str(student_dir), out=str(bundle), progress=False))
    assert sha256_file(bundle / MANIFEST) == before


def test_overwrite_replaces_a_bundle_and_refuses_a_non_bundle(tmp_path, student_dir, capsys):
    from autoglm_train.export.cli import export_main

    out = tmp_path / "b"
    small = ["--decoder", str(student_dir), "--out", str(out), "--no-int8", "--gguf", "none", "--no-onnx", "--quiet"]
    assert export_main([*small, "--dtype", "float16", "--no-verify"]) == 0
    assert "bundle written" in capsys.readouterr().out
    assert export_main([*small, "--dtype", "float32", "--no-verify"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert export_main([*small, "--dtype", "float32", "--no-verify", "--overwrite"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["forms"]["hf"]["dtype"] == "float32" and "parity" not in manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or old directories left

    not_a_bundle = tmp_path / "precious"
    not_a_bundle.mkdir()
    (not_a_bundle / "data.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        export_bundle(ExportOptions(decoder=str(student_dir), out=str(not_a_bundle), overwrite=True, progress=False))
    assert (not_a_bundle / "data.txt").read_text() == "keep me"


def test_failed_parity_leaves_no_bundle(tmp_path, student_dir, monkeypatch):
    import autoglm_train.export.verify as verify
    from autoglm_train.export.parity import FormReport

    def failing(bundle, **_):
        report = verify.VerifyReport(str(bundle), 0, "ref")
        report.forms.append(FormReport("hf", "transformers", "test", notes=["forced failure"]))
        return report

    monkeypatch.setattr(verify, "verify_bundle", failing)
    out = tmp_path / "b"
    opts = ExportOptions(decoder=str(student_dir), out=str(out), int8=False, gguf=[], onnx=False, progress=False)
    with pytest.raises(BundleError, match="failed parity; no bundle written"):
        export_bundle(opts)
    assert list(tmp_path.iterdir()) == []


# --- refusals that happen before any heavy work ---------------------------------------


def test_options_are_checked_up_front(tmp_path, student_dir, capsys):
    from autoglm_train.export.cli import export_main

    with pytest.raises(ValueError, match="dtype='int4'"):
        ExportOptions(decoder=str(student_dir), out=str(tmp_path / "x"), dtype="int4")
    with pytest.raises(ValueError, match="unknown GGUF"):
        ExportOptions(decoder=str(student_dir), out=str(tmp_path / "x"), gguf=["q4_k"])
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ExportOptions(decoder=str(tmp_path), out=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match=r"no plugin\.json"):
        ExportOptions(decoder=str(student_dir), out=str(tmp_path / "x"), plugins=[str(tmp_path)])
    with pytest.raises(ValueError, match="unknown tolerance key 'hf:int4'"):
        ExportOptions(decoder=str(student_dir), out=str(tmp_path / "x"), rtol={"hf:int4": 0.1})
    assert export_main(["--decoder", str(student_dir), "--out", str(tmp_path / "x"), "--rtol", "int8"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_plugin_for_another_decoder_width_is_refused(tmp_path, student_dir):
    from autoglm_train.model.plugin_io import save_plugin
    from tests.toy.sensor import SensorPlugin

    wide = save_plugin(SensorPlugin("sensor", 64, "<|modality_0|>", 4), tmp_path / "wide")
    opts = ExportOptions(decoder=str(student_dir), out=str(tmp_path / "b"), plugins=[str(wide)], progress=False)
    with pytest.raises(BundleError, match="projects to 64, decoder hidden size is 32"):
        export_bundle(opts)
    assert not (tmp_path / "b").exists()


def test_gguf_refuses_shapes_llama_cpp_cannot_run():
    from autoglm_train.export.gguf_writer import check_supported, pre_tokenizer_name

    with pytest.raises(ValueError, match=r"llama\.cpp's chatglm"):
        check_supported({"hidden_size": 32, "num_attention_heads": 4, "head_dim": 16})

    class Odd:
        def encode(self, text):
            return [1, 2, 3]

    with pytest.raises(ValueError, match="--gguf-pre"):
        pre_tokenizer_name(Odd())


# --- the slow path: ONNX + fp16, through both command lines -----------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason=NO_ONNX)
def test_cli_exports_fp16_and_onnx_and_verify_passes(tmp_path, student_dir, capsys):
    import numpy as np
    import onnxruntime as ort

    from autoglm_train.export.cli import export_main, verify_main
    from autoglm_train.export.hf_dir import load_reference

    out = tmp_path / "fp16-onnx"
    argv = ["--decoder", str(student_dir), "--out", str(out), "--dtype", "float16", "--no-int8", "--gguf", "none"]
    assert export_main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "onnx " in printed and "PASS" in printed and "FAIL" not in printed
    decoder = {f"decoder/{f}" for f in ("config.json", "generation_config.json", "model.safetensors")}
    decoder |= {f"decoder/{f}" for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}
    assert _files(out) == {"manifest.json", "onnx/model.onnx", "onnx/model.onnx.data", *decoder}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["forms"]["hf"]["dtype"] == "float16" and manifest["forms"]["onnx"]["kv_cache"] is False
    assert manifest["parity"]["forms"]["onnx"]["max_rel_logit_diff"] < 1e-4

    assert verify_main([str(out), "--strict", "--quiet"]) == 0  # the manifest's source is the reference
    assert "OK:" in capsys.readouterr().out

    # onnxruntime with shapes other than the export's example: batch 1 x 1 token, batch 3 x 17.
    session = ort.InferenceSession(str(out / "onnx/model.onnx"), providers=["CPUExecutionProvider"])
    reference = load_reference(student_dir)
    for batch, seq in [(1, 1), (3, 17)]:
        ids = torch.randint(0, 49000, (batch, seq))
        with torch.no_grad():
            expected = reference(input_ids=ids).logits.numpy()
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        assert np.abs(logits - expected).max() < 1e-4
