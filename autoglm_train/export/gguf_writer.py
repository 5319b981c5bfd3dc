"""The ``gguf/`` form: the decoder as GGUF files for llama.cpp (f16 and q8_0).

Written with the ``gguf`` package (llama.cpp's own writer library) rather than llama.cpp's
``convert_hf_to_gguf.py``, which is not shipped in any installed package and, for
``GlmForCausalLM``, reads only ChatGLM-era config keys: it ignores ``rms_norm_eps``,
``rope_theta`` and ``max_position_embeddings`` and looks up the ``<|user|>`` token that a
non-GLM tokenizer lacks. Here every hyper-parameter comes from the HF config.

HF ``GlmForCausalLM`` maps onto llama.cpp's ``chatglm`` architecture (GLM-4-9B-chat-hf is
converted the same way): separate q/k/v projections with biases, fused gate/up SwiGLU, RMSNorm,
adjacent-pair ("normal") rotary over the first ``head_dim * partial_rotary_factor`` dims.
Tensors are streamed one at a time, so memory stays at one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from autoglm_train.export.hf_dir import head_dim, rope
from autoglm_train.model.hf_io import iter_tensors, read_config, tensor_shapes

ARCH = "chatglm"
QTYPES = ("f16", "q8_0")

# llama.cpp picks its pre-tokenizer regex by name. It names a tokenizer by hashing the ids it
# gives for this text (convert_hf_to_gguf.py's get_vocab_base_pre); the hashes below are the
# ones llama.cpp lists for the tokenizer families this project uses (SmolLM, GLM-4, Llama-3, Qwen2, GPT-2).
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass(frozen=True)
class _Planned:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer`` (see KNOWN_PRE_TOKENIZERS)."""
    digest = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise ValueError(
            f"unknown pre-tokenizer (check hash {digest[:16]}…); pass --gguf-pre NAME with llama.cpp's name for it "
            f"(known here: {sorted(set(KNOWN_PRE_TOKENIZERS.values()))})"
        )
    return KNOWN_PRE_TOKENIZERS[digest]


def check_supported(config: dict[str, Any]) -> None:
    """llama.cpp's chatglm graph assumes ``heads * head_dim == hidden_size`` (its output projection is square)."""
    hd, heads, hidden = head_dim(config), config["num_attention_heads"], config["hidden_size"]
    if hd * heads != hidden:
        raise ValueError(
            f"GGUF: num_attention_heads ({heads}) x head_dim ({hd}) != hidden_size ({hidden}); llama.cpp's chatglm "
            "architecture cannot run this shape — export without --gguf"
        )


def write_gguf(
    weights_dir: Path,
    tokenizer_dir: Path,
    out_file: Path,
    qtype: str,
    model_name: str,
    pre: str | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert the fp32 decoder in ``weights_dir`` (tokenizer + chat template from ``tokenizer_dir``) to GGUF.

    Returns the form's manifest entry.
    """
    import gguf
    from transformers import AutoTokenizer

    if qtype not in QTYPES:
        raise ValueError(f"gguf qtype={qtype!r}; expected one of {QTYPES}")
    config = read_config(weights_dir)
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    writer = gguf.GGUFWriter(str(out_file), ARCH)
    _write_hparams(writer, config, qtype, model_name)
    _write_vocab(writer, tokenizer, tokenizer_dir, config["vocab_size"], pre or pre_tokenizer_name(tokenizer))
    plan = _plan(weights_dir, config, qtype)
    for p in plan:
        writer.add_tensor_info(p.gguf_name, *_info(p))
    writer.write_header_to_file(out_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    by_name = {p.hf_name: p for p in plan}
    for name, tensor in iter_tensors(weights_dir):
        if name in by_name:
            writer.write_tensor_data(_encode(tensor, by_name[name].qtype))
            if on_tensor:
                on_tensor(name)
    writer.close()
    return {
        "path": f"{out_file.parent.name}/{out_file.name}",
        "format": "gguf",
        "architecture": ARCH,
        "dtype": "float16" if qtype == "f16" else "q8_0",
        "quantization": None if qtype == "f16" else "q8_0 (blocks of 32, fp16 scale; 1-D tensors float32)",
        "consumers": ["llama.cpp", "llama-cpp-python"],
    }


def _write_hparams(writer, config: dict[str, Any], qtype: str, model_name: str) -> None:
    import gguf

    theta, factor = rope(config)
    writer.add_name(model_name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(head_dim(config) * factor))
    writer.add_rope_freq_base(theta)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, tokenizer, tokenizer_dir: Path, n_vocab: int, pre: str) -> None:
    """Byte-level BPE vocabulary padded to the decoder's rows, merges, special ids and the chat template."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"tokenizer has id {max(vocab.values())} but the decoder has only {n_vocab} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = tokenizer.chat_template
    # What the HF tokenizer really does when encoding plain text decides BOS/EOS, not the config's flags.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
    }
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.eos_token_id is not None:
        writer.add_eot_token_id(tokenizer.eos_token_id)  # end of an assistant turn = <|im_end|> in ChatML


def _plan(weights_dir: Path, config: dict[str, Any], qtype: str) -> list[_Planned]:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings"))
    plan = []
    for name, (shape, _) in tensor_shapes(weights_dir).items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{weights_dir}: tensor {name} has no llama.cpp {ARCH} counterpart")
        plan.append(_Planned(name, gguf_name, shape, _tensor_qtype(shape, qtype)))
    return plan


def _tensor_qtype(shape: tuple[int, ...], qtype: str):
    """1-D tensors (norms, biases) stay float32; q8_0 needs rows that split into 32-wide blocks."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _info(p: _Planned) -> tuple[tuple[int, ...], np.dtype, int, Any]:
    """``(shape, numpy dtype, nbytes, raw_dtype)`` for ``GGUFWriter.add_tensor_info``, before any data exists."""
    import gguf

    T = gguf.GGMLQuantizationType
    numel = int(np.prod(p.shape))
    if p.qtype == T.F32:
        return p.shape, np.dtype(np.float32), 4 * numel, None
    if p.qtype == T.F16:
        return p.shape, np.dtype(np.float16), 2 * numel, None
    byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), p.qtype


def _encode(tensor, qtype) -> np.ndarray:
    import gguf

    data = tensor.float().numpy()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(data.astype(np.float16))
    return gguf.quants.quantize(data, qtype)
