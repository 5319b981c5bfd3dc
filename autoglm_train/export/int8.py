"""The ``int8/`` form: a Hugging Face directory that transformers loads alone, weights int8 in memory.

Layout of ``int8/``: ``config.json`` (the decoder's config plus a ``quantization_config`` for
transformers' ``TorchAoConfig``: ``Int8WeightOnlyConfig(granularity=PerRow())``, the vocabulary
included), ``model.safetensors`` (torchao's safetensors layout: each int8 weight ``W`` as
``<module>._weight_qdata`` int8 [out, in] + ``_weight_scale`` float32 [out, 1] + ``_weight_zero_point``,
the tensor types in the file's metadata), and the tokenizer, chat template and generation config of the
bundle's ``decoder/``. No pickle anywhere, no project code to read it::

    AutoModelForCausalLM.from_pretrained("bundle/int8")   # needs torchao installed

Why written here rather than with ``from_pretrained(quantization_config=TorchAoConfig(...)).save_pretrained``:
transformers' torchao quantizer skips a tied embedding (it quantizes ``lm_head``, finds it tied, and saves the
embedding in float32), so the vocabulary — most of a small student's weights — would stay float. Here every
2-D weight is quantized by torchao's own config handler, one tensor at a time (memory stays at the int8
model), the tied head is stored once as the int8 embedding, and transformers re-ties it on load.

:func:`load_int8` also reads the earlier project-specific layout (``int8.json`` + ``<name>_scale``), which
``recipe=distill``'s ``student_int8/`` still uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoglm_train.export.hf_dir import HF_FILES, iter_tensors, read_config

INT8_META = "int8.json"
WEIGHTS = "model.safetensors"
SCALE_SUFFIX = "_scale"
SCHEME = (
    "weight-only int8, symmetric, per output channel (row), float32 scales (torchao Int8Tensor: "
    "scale = max|row| / 127.5, range [-128, 127]); tied vocab head stored once; norms/biases float32"
)
LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
QUANT_METHOD = "torchao"


def torchao_config():
    """The ``TorchAoConfig`` recorded in ``config.json``: weight-only per-row int8, embeddings included."""
    from transformers import TorchAoConfig

    from autoglm_train.quant.schemes import head_ptq_config

    return TorchAoConfig(head_ptq_config(), include_input_output_embeddings=True, untie_embedding_weights=False)


def is_standard_int8(directory: str | Path) -> bool:
    """Whether ``directory`` holds the form transformers loads alone (a torchao ``quantization_config``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    quant = json.loads(path.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD


def _quantizable(hf_config) -> set[str]:
    """Weight names of the ``nn.Linear``/``nn.Embedding`` modules, read from the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)}


def _quantize_weight(weight: torch.Tensor, config) -> nn.Parameter:
    """``weight`` [out, in] as torchao quantizes an ``nn.Linear`` under ``config`` (its handler, not a copy of it)."""
    from torchao.quantization import quantize_

    with torch.device("meta"):
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    holder.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config)
    return holder.weight


def write_int8(src: Path, out: Path, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Quantize the fp32 decoder in ``src`` into ``out``; returns the form's manifest entry.

    Args:
        src: the fp32 HF decoder directory training wrote.
        out: the ``int8/`` directory to create.
        tokenizer_dir: where the tokenizer, chat template and generation config to ship come from (the
            bundle's ``decoder/``); None ships none (the form then loads, but has no tokenizer of its own).
    """
    hf_quant = torchao_config()  # first: without torchao this names the extra to install
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers import AutoConfig

    out.mkdir(parents=True, exist_ok=True)
    hf_config = AutoConfig.from_pretrained(str(src))
    tied = bool(read_config(src).get("tie_word_embeddings"))
    quantizable = _quantizable(hf_config)
    state: dict[str, torch.Tensor] = {}
    quantized = []
    for name, tensor in iter_tensors(src):
        if tied and name == "lm_head.weight":
            continue  # the tied head is the embedding; stored once, re-tied by transformers on load
        if name in quantizable and tensor.is_floating_point():
            state[name] = _quantize_weight(tensor.float(), hf_quant.quant_type)
            quantized.append(name)
        else:
            state[name] = tensor.float().contiguous()
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(tensors, str(out / WEIGHTS), metadata={**metadata, "format": "pt"})
    hf_config.quantization_config = hf_quant
    hf_config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for name in HF_FILES:
            if name != "config.json" and (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return {
        "path": out.name,
        "format": "huggingface-torchao",
        "dtype": "int8",
        "quantization": SCHEME,
        "quantization_config": "TorchAoConfig(Int8WeightOnlyConfig(granularity=PerRow()), embeddings included)",
        "quantized_tensors": len(quantized),
        "loader": LOADER,
        "requires": ["transformers", "torchao"],
        "tokenizer": out.name if tokenizer_dir is not None else "decoder",
    }


def load_int8(directory: str | Path, dtype: torch.dtype = torch.float32, torchao: bool = False):
    """A ``GlmForCausalLM`` from an int8 folder.

    The standard form (``quantization_config`` in ``config.json``) is read by transformers alone and keeps
    its weights int8 (``dtype`` then only applies to the float tensors). The earlier ``autoglm-int8``
    layout (``student_int8/``) is dequantized to ``dtype``.

    Args:
        directory: the bundle's ``int8/`` folder, or a ``student_int8/`` folder.
        dtype: float dtype of the non-int8 tensors (and, for the earlier layout, of the dequantized weights).
        torchao: earlier layout only: re-quantize the linear layers with torchao's ``Int8WeightOnlyConfig``
            (needs ``pip install 'autoglm-train[quant]'``) so they are held as int8 in memory.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if is_standard_int8(directory):
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, use_safetensors=True).eval()
    return _load_autoglm_int8(directory, dtype, torchao)


def _load_autoglm_int8(directory: Path, dtype: torch.dtype, torchao: bool):
    """The earlier layout: ``int8.json`` + ``<name>`` int8 and ``<name>_scale``; dequantized into the model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    meta_path = directory / INT8_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path}: missing, and {directory / 'config.json'} has no torchao quantization_config; "
            f"{directory} is not an int8 export"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "autoglm-int8":
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not 'autoglm-int8'")
    raw = load_file(str(directory / WEIGHTS))
    state = {}
    for name in meta["quantized"]:
        state[name] = (raw.pop(name).float() * raw.pop(name + SCALE_SUFFIX)).to(dtype)
    state.update({k: v.to(dtype) for k, v in raw.items()})
    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS}: weights do not fit the config (missing {missing}, unexpected {unexpected})"
        )
    model.tie_weights()
    _init_buffers(model)
    model.eval()
    if torchao:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    return model


def _init_buffers(model) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in the state dict, so they are still on
    the meta device: rebuild each module holding one with its own constructor, on the CPU."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(module.config))
