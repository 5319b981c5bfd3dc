"""``--quantize int8`` in the server: the device's fastest kernel, one int8 vocabulary, the export's parity.

The serving test decoder (tests/serve_support.py) is exported with its standard ``int8/`` form; the
server loads that form (or, for a bundle without one, quantizes ``decoder/`` in memory) through
:func:`autoglm_train.engine.quantize.load_serving_decoder`, and is held to the export's int8 bound.
"""

from __future__ import annotations

import pytest
import torch

from autoglm_train.engine.bundle import read_bundle
from tests.serve_support import one_thread

# every test here runs the int8pack kernel: a kernel crash fails that test by name, not the whole run (issue 25)
pytestmark = pytest.mark.isolated


@pytest.fixture(scope="module")
def int8_bundle(bundles, tmp_path_factory):
    """The serving test decoder exported with an ``int8/`` form (no GGUF/ONNX; parity is checked below)."""
    from autoglm_train.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("int8-serve") / "bundle"
    opts = ExportOptions(
        decoder=str(bundles.full / "decoder"),
        out=str(out),
        dtype="float32",
        gguf=[],
        onnx=False,
        verify=False,
        progress=False,
    )
    with one_thread():
        return export_bundle(opts)[0]


@pytest.fixture(scope="module")
def reference(int8_bundle):
    """The fp32 decoder's answers on the export's parity prompts."""
    from transformers import AutoTokenizer

    from autoglm_train.engine.quantize import load_serving_decoder
    from autoglm_train.export.parity import reference_answers

    decoder, dtype, description = load_serving_decoder(read_bundle(int8_bundle), "cpu", "auto", None)
    assert (dtype, description) == (torch.float32, None)
    tokenizer = AutoTokenizer.from_pretrained(int8_bundle / "decoder")
    with one_thread():
        return decoder, tokenizer, reference_answers(decoder, tokenizer)


def _serve_int8(path, dtype: str = "auto"):
    from autoglm_train.engine.quantize import load_serving_decoder

    with one_thread():
        return load_serving_decoder(read_bundle(path), "cpu", dtype, "int8")


def _check_int8pack_layout(decoder) -> None:
    from torch import nn

    from autoglm_train.quant.int8_modules import Int8Embedding, Int8PackedLinear

    head, embed = decoder.get_output_embeddings(), decoder.get_input_embeddings()
    assert isinstance(head, Int8PackedLinear) and isinstance(embed, Int8Embedding)
    assert head.qdata.dtype == torch.int8
    assert embed.weight.qdata.data_ptr() == head.qdata.data_ptr(), "the tied head and embedding must share one matrix"
    float_linears = [n for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    assert not float_linears, f"linears left in float: {float_linears}"


@pytest.mark.parametrize("with_form", [True, False], ids=["int8-form", "in-memory"])
def test_every_packed_int8_weight_and_scale_is_64_byte_aligned(bundles, int8_bundle, with_form):
    """The int8pack kernel faults on AVX-512 for a weight that lies in its safetensors file as loaded (issue 25)."""
    from autoglm_train.quant.int8_modules import Int8Embedding, Int8PackedLinear
    from autoglm_train.utils.aligned import ALIGNMENT

    decoder, _, _ = _serve_int8(int8_bundle if with_form else bundles.full)
    packed = {
        f"{name}.{field}": getattr(module, field)
        for name, module in decoder.named_modules()
        if isinstance(module, Int8PackedLinear)
        for field in ("qdata", "scale")
    }
    assert len(packed) >= 2 * 13, sorted(packed)  # 2 blocks x 6 linears + the head, weight and scale each
    misaligned = {name: t.data_ptr() % ALIGNMENT for name, t in packed.items() if t.data_ptr() % ALIGNMENT}
    assert not misaligned, f"tensors off a {ALIGNMENT}-byte boundary (name: data_ptr % {ALIGNMENT}): {misaligned}"
    embed = decoder.get_input_embeddings()
    assert (
        isinstance(embed, Int8Embedding) and embed.qdata.data_ptr() == decoder.get_output_embeddings().qdata.data_ptr()
    )


def test_cpu_int8_serves_the_standard_form_with_the_int8pack_kernel(int8_bundle, reference):
    from autoglm_train.export.parity import TOLERANCES, TorchRunner, compare
    from autoglm_train.quant.size import weight_bytes

    fp32, _, ref = reference
    decoder, dtype, description = _serve_int8(int8_bundle)
    assert dtype == torch.float32
    assert "int8pack" in description and "int8/" in description and "one int8 matrix" in description, description
    _check_int8pack_layout(decoder)
    ratio = weight_bytes(decoder) / weight_bytes(fp32)
    assert ratio <= 0.5, f"int8 decoder holds {ratio:.3f}x the fp32 bytes"
    with one_thread():
        report = compare("int8", "load_serving_decoder", TorchRunner(decoder), ref, TOLERANCES["int8"])
    print(f"\nserved int8 vs fp32: bytes {ratio:.3f}x, max rel logit diff {report.max_rel_logit_diff:.4f}")
    assert report.passed, report.notes
    assert report.greedy_identical_per_prompt[0]  # the sentence the decoder learned continues identically


def test_a_bundle_without_int8_form_is_quantized_in_memory_to_the_same_numbers(bundles, int8_bundle):
    """The float decoder quantized at start-up and the exported form give bit-identical logits (same scheme)."""
    from_form, _, _ = _serve_int8(int8_bundle)
    in_memory, _, description = _serve_int8(bundles.full)
    assert "quantized at start-up" in description and "int8pack" in description, description
    _check_int8pack_layout(in_memory)
    ids = torch.tensor([[504, 2365, 6354, 16438, 42, 7]])
    with torch.inference_mode(), one_thread():
        assert torch.equal(from_form(input_ids=ids).logits, in_memory(input_ids=ids).logits)


def test_bfloat16_int8_server_on_cpu(int8_bundle, reference):
    """dtype=bfloat16 retargets the form's int8 weights (made from fp32) to bf16 compute; logits stay close."""
    fp32, _, ref = reference
    decoder, dtype, _ = _serve_int8(int8_bundle, "bfloat16")
    assert dtype == torch.bfloat16 and decoder.model.norm.weight.dtype == torch.bfloat16
    ids = torch.tensor([ref.ids[0]])
    with torch.inference_mode(), one_thread():
        got = decoder(input_ids=ids).logits.float()
        want = fp32(input_ids=ids).logits
    assert (got - want).abs().max() <= 0.1 * want.abs().max()
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))


@pytest.mark.parametrize("with_form", [True, False], ids=["int8-form", "in-memory"])
def test_an_untied_decoder_keeps_two_int8_vocab_matrices(tmp_path, student_tok, with_form):
    """GLM-4-9B-shaped decoders do not tie the head: both matrices are int8, the embedding still has a weight."""
    from autoglm_train.engine.quantize import load_serving_decoder
    from autoglm_train.export.parity import TOLERANCES, TorchRunner, compare, reference_answers
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.model.hf_io import save_hf_decoder
    from autoglm_train.quant.int8_layout import write_int8
    from autoglm_train.quant.int8_modules import Int8Embedding, Int8PackedLinear
    from tests.conftest import micro_spec

    torch.manual_seed(0)
    model = build_decoder(
        micro_spec(tie_word_embeddings=False), len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id
    ).eval()
    decoder_dir = save_hf_decoder(model, student_tok, tmp_path / "bundle" / "decoder")
    if with_form:
        write_int8(decoder_dir, tmp_path / "bundle" / "int8", tokenizer_dir=decoder_dir)
    with one_thread():
        decoder, _, description = load_serving_decoder(read_bundle(tmp_path / "bundle"), "cpu", "auto", "int8")
        ref = reference_answers(model, student_tok, n_new=4)
        report = compare("int8", "load_serving_decoder", TorchRunner(decoder), ref, TOLERANCES["int8"])
    assert ("int8/" in description) is with_form and "vocab head and embedding int8" in description, description
    head, embed = decoder.get_output_embeddings(), decoder.get_input_embeddings()
    assert isinstance(head, Int8PackedLinear) and isinstance(embed, Int8Embedding)
    assert embed.weight.qdata.dtype == torch.int8 and embed.weight.device.type == "cpu"
    assert embed.weight.qdata.data_ptr() != head.qdata.data_ptr()
    assert report.max_rel_logit_diff <= TOLERANCES["int8"].rtol, report.notes


def test_unknown_quantization_or_dtype_is_refused(bundles):
    from autoglm_train.engine.quantize import load_serving_decoder

    info = read_bundle(bundles.text_only)
    with pytest.raises(ValueError, match="quantize='int4'"):
        load_serving_decoder(info, "cpu", "auto", "int4")
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_serving_decoder(info, "cpu", "int8", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int8_serves_torchao_linears(int8_bundle, reference):
    from autoglm_train.engine.quantize import load_serving_decoder
    from autoglm_train.quant.int8_modules import Int8Embedding

    fp32, _, ref = reference
    decoder, dtype, description = load_serving_decoder(read_bundle(int8_bundle), "cuda", "bfloat16", "int8")
    assert "torchao" in description and dtype == torch.bfloat16
    assert isinstance(decoder.get_input_embeddings(), Int8Embedding)
    ids = torch.tensor([ref.ids[0]], device="cuda")
    with torch.inference_mode():
        got = decoder(input_ids=ids).logits.float().cpu()
        want = fp32(input_ids=ids.cpu()).logits
    assert (got - want).abs().max() <= 0.1 * want.abs().max()
