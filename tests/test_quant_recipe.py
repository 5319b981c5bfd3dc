"""recipe=distill with the int8 switches, end to end on tiny shapes (real teacher, real text)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distill_recipe import _compose, _corpus, _overrides


@pytest.mark.slow
def test_qat_distill_saves_a_float_student_plus_its_int8_form_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    from autoglm_train.quant.int8_layout import read_record, source_record
    from recipes.distill import run

    corpus = _corpus(tmp_path)
    first = run(_compose([*_overrides(tmp_path, corpus, steps=4), "quant=qat_int8", "quant.ptq.eval_batches=2"]))
    out = tmp_path / "outputs" / "t"
    assert first["global_step"] == 4 and first["quant"]["qat"]["scheme"] == "int8_dynamic"
    for key in ("ptq/ppl", "ptq/kl_to_float", "ptq/top1_agreement_with_float", "ptq/weight_bytes_ratio"):
        assert first[key] == first[key], key  # present, not NaN
    assert first["ptq/top1_agreement_with_float"] > 0.9 and first["ptq/weight_bytes_ratio"] < 0.35
    # the saved student is a plain float HF checkpoint: no fake-quant modules, no int8 tensors
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert all(type(m).__name__ != "FakeQuantizedLinear" for m in student.modules())
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "student" / "model.safetensors")).values())
    # student_int8/ is the standard TorchAoConfig form, with the QAT scheme, written from the saved student
    record = read_record(out / "student_int8")
    assert record["scheme"] == "int8_dynamic" and record["source"] == source_record(out / "student")
    int8 = AutoModelForCausalLM.from_pretrained(out / "student_int8")
    assert int8.model.layers[0].mlp.down_proj.weight.act_quant_kwargs is not None  # dynamic activations on load
    # checkpoints taken under fake-quant are plain tensors, and the run resumes from them
    ckpts = sorted((out / "checkpoints").glob("step=*.ckpt"))
    assert ckpts and load_file(str(ckpts[-1] / "tensors.safetensors"))
    again = run(_compose([*_overrides(tmp_path, corpus, steps=6), "quant=qat_int8", "quant.ptq.eval_batches=1"]))
    assert again["resumed_from"] and again["global_step"] == 6


@pytest.mark.slow
def test_int8_teacher_and_8bit_optimizer_switches_train(tmp_path):
    from recipes.distill import run

    summary = run(_compose([*_overrides(tmp_path, _corpus(tmp_path), steps=2), "quant=[int8_teacher,int8_optim]"]))
    assert summary["global_step"] == 2 and summary["quant"] == {"int8_teacher": True, "int8_optim": True}
    assert summary["val/loss"] == summary["val/loss"]
