"""Every GGUF form the exporter writes, read back with the ``gguf`` package's own reader (no llama.cpp needed).

Checks what llama.cpp would read: hyper-parameters, tensor names/shapes/types, the tokenizer (tokens,
types, merges, special ids, chat template) and the weights themselves, dequantized with
``gguf.quants.dequantize`` and held to each format's rounding bound. The llama.cpp greedy-parity test
(``tests/test_export.py``) stays for ``make test-gguf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from autoglm_train.export.bundle import GGUF_QTYPES
from tests.conftest import micro_spec

FILE_TYPE = {"f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_F16 / MOSTLY_Q8_0
Q8_BLOCK = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student_tok) -> tuple[Path, Path]:
    """``(fp32 source decoder, bundle)`` with every GGUF form; an untied micro GLM, so ``output.weight`` is written."""
    from autoglm_train.export.bundle import ExportOptions, export_bundle
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.model.hf_io import save_hf_decoder

    torch.manual_seed(0)
    spec = micro_spec(tie_word_embeddings=False)
    model = build_decoder(spec, len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id).eval()
    with torch.no_grad():  # a few weights of very different size, so q8_0's per-block scale is exercised
        model.model.layers[0].mlp.down_proj.weight[0, :8] *= 50
    src = save_hf_decoder(model, student_tok, tmp_path_factory.mktemp("gguf-src") / "student")
    out = tmp_path_factory.mktemp("gguf-bundle") / "bundle"
    opts = ExportOptions(
        decoder=str(src), out=str(out), int8=False, gguf=list(GGUF_QTYPES), onnx=False, verify=False, progress=False
    )
    return src, export_bundle(opts)[0]


@pytest.fixture(scope="module")
def readers(exported) -> dict:
    """One ``GGUFReader`` per form (parsing ~49k token strings takes seconds: read each file once)."""
    return {q: gguf.GGUFReader(str(exported[1] / "gguf" / f"model-{q}.gguf")) for q in GGUF_QTYPES}


def _field(reader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"GGUF field {key} missing"
    return field.contents()


def _source(src: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(src / "model.safetensors"))


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
def test_gguf_hyper_parameters_read_back(exported, readers, qtype):
    src = exported[0]
    config = json.loads((src / "config.json").read_text())
    reader = readers[qtype]
    assert _field(reader, "general.architecture") == "chatglm"
    assert _field(reader, "general.file_type") == FILE_TYPE[qtype]
    assert _field(reader, "general.name") == "bundle"
    expected = {
        "chatglm.context_length": config["max_position_embeddings"],
        "chatglm.embedding_length": config["hidden_size"],
        "chatglm.feed_forward_length": config["intermediate_size"],
        "chatglm.block_count": config["num_hidden_layers"],
        "chatglm.attention.head_count": config["num_attention_heads"],
        "chatglm.attention.head_count_kv": config["num_key_value_heads"],
        "chatglm.rope.dimension_count": 4,  # head_dim 8 x partial_rotary_factor 0.5
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "chatglm.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
def test_gguf_tensor_names_shapes_and_types(exported, readers, qtype):
    src = exported[0]
    source = _source(src)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, 2)
    expected = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in source}
    assert None not in expected
    tensors = {t.name: t for t in readers[qtype].tensors}
    assert set(tensors) == set(expected)
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.bias"} <= set(tensors)
    T = gguf.GGMLQuantizationType
    for name, hf in expected.items():
        t, shape = tensors[name], source[hf].shape
        assert tuple(int(d) for d in reversed(t.shape)) == shape, name  # GGUF lists dimensions innermost first
        if len(shape) == 1:
            want = T.F32
        elif qtype == "q8_0" and shape[-1] % Q8_BLOCK == 0:
            want = T.Q8_0
        else:
            want = T.F16
        assert t.tensor_type == want, (name, t.tensor_type.name)
        assert t.n_elements == int(np.prod(shape))


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
def test_gguf_tokenizer_metadata_matches_the_bundle_tokenizer(exported, readers, qtype):
    from transformers import AutoTokenizer

    src, bundle = exported
    tok = AutoTokenizer.from_pretrained(bundle / "decoder")
    reader = readers[qtype]
    n_vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == n_vocab
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert all(tokens[i].startswith("[PAD") for i in range(len(tok), n_vocab))  # rows beyond the tokenizer
    TT = gguf.TokenType
    assert types[tok.eos_token_id] == TT.CONTROL and types[vocab["<|modality_0|>"]] == TT.CONTROL
    assert types[vocab["the"]] == TT.NORMAL
    merges = json.loads((bundle / "decoder/tokenizer.json").read_text())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert "enable_thinking" in tok.chat_template


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
def test_gguf_weights_dequantize_to_the_source_within_the_format_bound(exported, readers, qtype):
    """f16: within half an fp16 ulp; q8_0: within 0.57 of each 32-block's step max|block|/127 (rounding to the
    step plus the fp16 rounding of the block scale); float32 vectors exact."""
    src = exported[0]
    source = _source(src)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, 2)
    T = gguf.GGMLQuantizationType
    seen = set()
    for t in readers[qtype].tensors:
        hf = next(k for k in source if names.get_name(k, try_suffixes=(".weight", ".bias")) == t.name)
        want = source[hf].astype(np.float32)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        err = np.abs(got - want)
        if t.tensor_type == T.F32:
            assert np.array_equal(got, want), t.name
        elif t.tensor_type == T.F16:
            assert np.all(err <= np.abs(want) * 2.0**-11 + 2.0**-25), t.name
        else:
            assert t.tensor_type == T.Q8_0
            blocks = np.abs(want).reshape(-1, Q8_BLOCK).max(axis=1, keepdims=True)
            assert np.all(err.reshape(-1, Q8_BLOCK) <= 0.57 * blocks / 127 + 1e-12), t.name
            assert err.max() > 0  # really quantized, not stored as float
        seen.add(t.tensor_type)
    assert seen == ({T.F32, T.F16} if qtype == "f16" else {T.F32, T.Q8_0})
