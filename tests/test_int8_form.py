"""One int8 form: recipe=distill's PTQ writes ``student_int8/`` in the standard TorchAoConfig layout, measures the
file it wrote, and the export ships that same file as ``int8/`` while the student is unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import micro_spec

pytest.importorskip("torchao")


def _batches(vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _student(student_tok, run: Path, seed: int = 0):
    """A micro student saved as recipe=distill saves it, at ``run/student``."""
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.model.hf_io import save_hf_decoder

    torch.manual_seed(seed)
    model = build_decoder(micro_spec(), len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id).eval()
    return model, save_hf_decoder(model, student_tok, run / "student")


@pytest.fixture(scope="module")
def run(tmp_path_factory, student_tok):
    """A run folder (``student/`` + ``student_int8/`` written by the PTQ step) and the step's ``ptq/*``."""
    from autoglm_train.quant.int8_form import int8_form
    from autoglm_train.quant.ptq import PTQSpec

    root = tmp_path_factory.mktemp("run")
    model, student_dir = _student(student_tok, root)
    metrics = int8_form(model, student_dir, PTQSpec(), _batches(len(student_tok)), None, root / "student_int8")
    return root, model, metrics


def test_ptq_writes_the_standard_form_and_measures_the_file_it_wrote(run, student_tok):
    from transformers import AutoModelForCausalLM

    from autoglm_train.quant.compare import compare_to_reference
    from autoglm_train.quant.int8_layout import load_int8, read_record, source_record

    root, model, metrics = run
    form = root / "student_int8"
    assert metrics["ptq/dir"] == str(form) and not (form / "int8.json").exists()
    assert json.loads((form / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    loaded = AutoModelForCausalLM.from_pretrained(form)  # transformers alone, with the TorchAo config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.embed_tokens.weight.qdata.dtype == torch.int8
    assert loaded.model.layers[0].mlp.down_proj.weight.qdata.dtype == torch.int8
    assert read_record(form)["source"] == source_record(root / "student")
    # ptq/* are the numbers of the file on disk, loaded back as served (not of a model kept in memory)
    again = compare_to_reference(model, {"int8": load_int8(form, kernel="torchao")}, _batches(len(student_tok)))
    assert metrics["ptq/kl_to_float"] == again["int8"].kl_to_ref and metrics["ptq/ppl"] == again["int8"].ppl
    assert metrics["ptq/top1_agreement_with_float"] == again["int8"].top1_agreement > 0.9


def test_export_ships_the_measured_form_while_the_student_is_unchanged(run, tmp_path, student_tok):
    from autoglm_train.engine.bundle import read_bundle
    from autoglm_train.engine.quantize import standard_int8_dir
    from autoglm_train.export.bundle import ExportOptions, export_bundle

    root, _, _ = run
    opts = ExportOptions(
        decoder=str(root / "student"), out=str(tmp_path / "b"), gguf=[], onnx=False, dtype="float32", progress=False
    )
    bundle, report = export_bundle(opts)
    entry = json.loads((bundle / "manifest.json").read_text())["forms"]["int8"]
    assert entry["reused_from"] == str(root / "student_int8"), entry
    for name in ("model.safetensors", "config.json"):
        assert (bundle / "int8" / name).read_bytes() == (root / "student_int8" / name).read_bytes()
    assert report.passed and next(f for f in report.forms if f.form == "int8").passed  # parity holds on it
    assert standard_int8_dir(read_bundle(bundle)) == bundle / "int8"  # the server loads this form


def test_export_quantizes_again_when_the_student_changed(run, tmp_path, student_tok):
    from autoglm_train.export.bundle import ExportOptions, export_bundle
    from autoglm_train.quant.int8_layout import read_record, source_record

    root = tmp_path / "run"
    root.mkdir()
    shutil.copytree(run[0] / "student_int8", root / "student_int8")  # measured on the first student...
    _student(student_tok, root, seed=1)  # ...then the student was retrained at the same path
    opts = ExportOptions(
        decoder=str(root / "student"), out=str(tmp_path / "b"), gguf=[], onnx=False, verify=False, progress=False
    )
    bundle, _ = export_bundle(opts)
    entry = json.loads((bundle / "manifest.json").read_text())["forms"]["int8"]
    assert entry["reused_from"] is None and "other weights" in entry["not_reused"], entry
    assert read_record(bundle / "int8")["source"] == source_record(root / "student")
    assert (bundle / "int8/model.safetensors").read_bytes() != (root / "student_int8/model.safetensors").read_bytes()


def test_a_form_of_another_scheme_is_not_reused(run, tmp_path):
    from autoglm_train.export.int8 import reuse_refusal
    from autoglm_train.quant.int8_layout import write_int8

    root = run[0]
    write_int8(root / "student", tmp_path / "dynamic", scheme="int8_dynamic")
    assert "scheme=int8_dynamic" in reuse_refusal(tmp_path / "dynamic", root / "student")
    assert reuse_refusal(root / "student_int8", root / "student") is None
    assert reuse_refusal(tmp_path / "missing", root / "student").startswith("no ")
