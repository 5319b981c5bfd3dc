"""quant=int8_teacher: a bitsandbytes int8 teacher loads on CPU and stays close to its fp32 self."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def teacher_dir(tmp_path, micro_decoder, student_tok):
    from autoglm_train.model.hf_io import save_hf_decoder

    with torch.no_grad():  # a sharper than random-init head, so top-1 is not decided by ties
        micro_decoder.get_output_embeddings().weight.mul_(8.0)
    return save_hf_decoder(micro_decoder, student_tok, tmp_path / "teacher")


def _batches(vocab: int):
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(4))
    return [{"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}]


def test_int8_teacher_loads_on_cpu_and_gives_close_logits(teacher_dir, student_tok):
    from autoglm_train.distill.teacher import TeacherSpec, load_teacher
    from autoglm_train.quant.compare import compare_to_reference

    fp32 = load_teacher(TeacherSpec(path=str(teacher_dir)))
    int8 = load_teacher(TeacherSpec(path=str(teacher_dir), load_in_8bit=True))
    assert getattr(int8, "is_loaded_in_8bit", False)
    assert any(type(m).__name__ == "Linear8bitLt" for m in int8.modules())
    assert not any(p.requires_grad for p in int8.parameters())
    scores = compare_to_reference(fp32, {"int8": int8}, _batches(len(student_tok)), len(student_tok))["int8"]
    assert scores.kl_to_ref < 0.05, scores
    assert scores.top1_agreement >= 0.9, scores


def test_int8_teacher_from_a_gguf_conversion(teacher_dir, student_tok):
    """A GGUF-converted teacher's config still names GgufConfig; load_in_8bit must not trip over it."""
    from autoglm_train.distill.teacher import TeacherSpec, load_teacher
    from autoglm_train.quant.compare import compare_to_reference

    fp32 = load_teacher(TeacherSpec(path=str(teacher_dir)))
    config = json.loads((teacher_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (teacher_dir / "config.json").write_text(json.dumps(config))
    int8 = load_teacher(TeacherSpec(path=str(teacher_dir), load_in_8bit=True))
    assert int8.config.quantization_config.quant_method == "bitsandbytes"  # the gguf entry is gone, int8 in its place
    assert sum(type(m).__name__ == "Linear8bitLt" for m in int8.modules()) == sum(
        type(m).__name__ == "Linear" for m in fp32.model.modules()
    )  # every decoder projection is int8 (lm_head stays fp32, as bitsandbytes leaves it)
    vocab = len(student_tok)
    scores = compare_to_reference(fp32, {"int8": int8}, _batches(vocab), vocab)["int8"]
    assert scores.kl_to_ref < 0.05 and scores.top1_agreement >= 0.9, scores  # the same weights, in int8


def test_quant_int8_teacher_selects_load_in_8bit(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["quant=int8_teacher", f"paths.root_dir={tmp_path}"])
    assert cfg.teacher.load_in_8bit is True
    assert instantiate(cfg.teacher).load_in_8bit
