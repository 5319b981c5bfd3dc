"""PTQ int8 of a float student: weight-only and dynamic, head + tied embedding as one int8 matrix, round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import micro_spec

VOCAB = 8192  # a vocab-dominated micro model, like the tiny student


def _micro(**overrides):
    from autoglm_train.model.decoder import build_decoder

    torch.manual_seed(0)
    return build_decoder(micro_spec(**overrides), VOCAB, 0, 1).eval()


def _ids(t: int = 12):
    return torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_quantize_model_int8_everywhere_and_close_to_float(scheme):
    from torchao.quantization import Int8Tensor

    from autoglm_train.quant.int8_modules import Int8Embedding
    from autoglm_train.quant.ptq import PTQSpec, quantize_model
    from autoglm_train.quant.size import weight_bytes

    model = _micro()
    ids = _ids()
    ref, float_bytes = _logits(model, ids), weight_bytes(model)
    report = quantize_model(model, PTQSpec(scheme=scheme))
    assert report["linear"] == 12 and report["tied"]
    blocks = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert all(isinstance(m.weight, Int8Tensor) for m in blocks)
    dynamic = [m.weight.act_quant_kwargs is not None for m in blocks]
    assert all(dynamic) if scheme == "int8_dynamic" else not any(dynamic)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head.weight, Int8Tensor) and head.weight.act_quant_kwargs is None  # head: weight-only
    assert isinstance(embed, Int8Embedding) and embed.weight is head.weight  # one int8 matrix for both
    assert weight_bytes(model) <= 0.3 * float_bytes
    out = _logits(model, ids)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_leaving_the_vocab_float_keeps_most_of_the_bytes():
    from autoglm_train.quant.ptq import PTQSpec, quantize_model
    from autoglm_train.quant.size import weight_bytes

    model = _micro()
    before = weight_bytes(model)
    quantize_model(model, PTQSpec(head=False))
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert weight_bytes(model) > 0.8 * before


def test_untied_embedding_gets_its_own_int8_rows():
    from autoglm_train.quant.int8_modules import Int8Embedding
    from autoglm_train.quant.ptq import quantize_model

    model = _micro(tie_word_embeddings=False)
    ids = _ids()
    ref = _logits(model, ids)
    quantize_model(model)
    embed = model.get_input_embeddings()
    assert isinstance(embed, Int8Embedding) and embed.qdata.dtype == torch.int8
    assert (_logits(model, ids) - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.isolated  # runs the int8pack kernel: a crash fails this test alone
def test_int8pack_kernel_matches_torchao_weight_only():
    import copy

    from autoglm_train.quant.int8_modules import PACKED_MAX_ROWS, Int8PackedLinear
    from autoglm_train.quant.ptq import PTQSpec, quantize_model

    model = _micro()
    packed = copy.deepcopy(model)
    quantize_model(model, PTQSpec(kernel="torchao"))
    report = quantize_model(packed, PTQSpec(kernel="int8pack"))
    assert report["packed"] == 13 and isinstance(packed.get_output_embeddings(), Int8PackedLinear)
    for t in (4, PACKED_MAX_ROWS + 8):  # the int8 matvec kernel, then the dequantize + GEMM path
        ids = _ids(t)
        a, b = _logits(model, ids), _logits(packed, ids)
        assert (a - b).abs().max() <= 0.02 * a.abs().max()  # bf16 activations


@pytest.mark.parametrize(
    ("scheme", "head", "tied"),
    [("int8_weight_only", True, True), ("int8_dynamic", True, False), ("int8_weight_only", False, True)],
)
def test_the_int8_form_on_disk_loads_back_bit_identical_to_ptq_in_memory(tmp_path, scheme, head, tied):
    """What recipe=distill measures (the form loaded back) is what quantize_model computes, to the bit."""
    import copy

    from safetensors import safe_open

    from autoglm_train.quant.int8_layout import load_int8, read_record, write_int8
    from autoglm_train.quant.ptq import PTQSpec, quantize_model

    model = _micro(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "student")
    write_int8(tmp_path / "student", tmp_path / "student_int8", scheme=scheme, head=head)
    assert read_record(tmp_path / "student_int8")["scheme"] == scheme
    with safe_open(str(tmp_path / "student_int8" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj._weight_qdata").dtype == torch.int8
    assert ("model.embed_tokens._weight_qdata" in names) == head  # the vocabulary int8 too, or left float
    assert any(name.startswith("lm_head.") for name in names) == (not tied)  # a tied head is stored once
    in_memory = copy.deepcopy(model)
    quantize_model(in_memory, PTQSpec(scheme=scheme, head=head))
    loaded = load_int8(tmp_path / "student_int8", kernel="torchao")
    dynamic = [
        getattr(m.weight, "act_quant_kwargs", None) is not None
        for m in loaded.model.layers.modules()
        if isinstance(m, nn.Linear)
    ]
    assert all(dynamic) == (scheme == "int8_dynamic") and any(dynamic) == (scheme == "int8_dynamic")
    for t in (3, 12):
        ids = _ids(t)
        assert torch.equal(_logits(loaded, ids), _logits(in_memory, ids))


def test_errors_are_clear():
    from autoglm_train.quant.ptq import PTQSpec, quantize_model
    from autoglm_train.quant.qat import QATSpec, prepare_qat

    with pytest.raises(ValueError, match=r"quant\.ptq\.scheme='int4'.*int8_weight_only"):
        PTQSpec(scheme="int4")
    with pytest.raises(ValueError, match=r"quant\.ptq\.kernel"):
        PTQSpec(kernel="cuda")
    model = _micro()
    quantize_model(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    model = _micro()
    prepare_qat(model, QATSpec())
    with pytest.raises(ValueError, match="convert_qat"):
        quantize_model(model)
