"""The ``int8/`` form: weight-only int8 safetensors with per-output-channel scales, and its loader.

Layout of ``int8/``: ``config.json`` (the decoder's HF config), ``int8.json`` (this scheme and the
list of quantized tensors) and ``model.safetensors`` where every 2-D weight ``W`` [out, in] is
stored as ``<name>`` (int8) plus ``<name>_scale`` (float32 [out, 1]) with ``W ≈ q · scale``,
``scale = max|W[row]| / 127``. Norms and biases stay float32. No pickle anywhere.

A consumer loads it with :func:`load_int8` (dequantizes into a stock ``GlmForCausalLM``; with
``torchao=True`` the linear layers are then re-quantized by torchao's ``Int8WeightOnlyConfig``
so weights stay int8 in memory). The tokenizer lives in the bundle's ``decoder/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from autoglm_train.export.hf_dir import iter_tensors, read_config

INT8_META = "int8.json"
WEIGHTS = "model.safetensors"
SCALE_SUFFIX = "_scale"
SCHEME = "weight-only int8, symmetric, per output channel (row), float32 scales; norms/biases float32"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [out, in], scale float32 [out, 1])`` with ``weight ≈ q * scale``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def write_int8(src: Path, out: Path) -> dict[str, Any]:
    """Quantize the fp32 decoder in ``src`` into ``out``; returns the form's manifest entry."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = read_config(src)
    tied = bool(config.get("tie_word_embeddings"))
    state: dict[str, torch.Tensor] = {}
    quantized = []
    for name, tensor in iter_tensors(src):
        if tied and name == "lm_head.weight":
            continue  # the tied head is the embedding; stored once
        if tensor.ndim == 2 and tensor.is_floating_point():
            q, scale = quantize_rows(tensor)
            state[name], state[name + SCALE_SUFFIX] = q, scale
            quantized.append(name)
        else:
            state[name] = tensor.float().contiguous()
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "quantization": "autoglm-int8"})
    shutil.copyfile(src / "config.json", out / "config.json")
    meta = {"format": "autoglm-int8", "version": 1, "scheme": SCHEME, "quantized": sorted(quantized)}
    (out / INT8_META).write_text(json.dumps(meta, indent=2) + "\n")
    return {
        "path": out.name,
        "format": "safetensors-int8",
        "dtype": "int8",
        "quantization": SCHEME,
        "loader": "autoglm_train.export.int8.load_int8",
        "tokenizer": "decoder",
    }


def load_int8(directory: str | Path, dtype: torch.dtype = torch.float32, torchao: bool = False):
    """A ``GlmForCausalLM`` from an ``int8/`` folder, dequantized to ``dtype``.

    Args:
        directory: the bundle's ``int8/`` folder.
        dtype: the dtype weights are dequantized to (and the forward runs in).
        torchao: re-quantize the linear layers with torchao's ``Int8WeightOnlyConfig`` (needs
            ``pip install 'autoglm-train[quant]'``) so they are held as int8 in memory.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    meta_path = directory / INT8_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; {directory} is not an int8 export")
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
