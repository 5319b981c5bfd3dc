"""The ``decoder/`` form: a plain Hugging Face GLM directory in fp32, fp16 or bf16.

Loads in ``transformers.AutoModelForCausalLM`` with no project code, and is laid out the way
vLLM's ``GlmForCausalLM`` expects. The other forms all convert from the fp32 source (read with
:mod:`autoglm_train.model.hf_io`) so that no form rounds twice.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from autoglm_train.model.hf_io import read_config

ARCHITECTURE = "GlmForCausalLM"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_glm(config: dict[str, Any], where: str | Path) -> None:
    """Refuse anything but a stock ``GlmForCausalLM`` (the only decoder the forms know how to convert)."""
    archs = config.get("architectures") or []
    if archs != [ARCHITECTURE]:
        raise ValueError(f"{where}: architectures={archs}, the exporter handles [{ARCHITECTURE!r}] decoders only")
    if config.get("auto_map"):
        raise ValueError(f"{where}: config has auto_map (remote code); a bundle decoder must be stock transformers")


def rope(config: dict[str, Any]) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from a transformers 5 or 4 style config."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    return float(theta), float(factor)


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def vllm_problems(config: dict[str, Any]) -> list[str]:
    """Why vLLM's ``GlmForCausalLM`` (Llama layers + GLM rotary) would load this config wrongly; empty if fine.

    vLLM forces ``partial_rotary_factor = 0.5`` and non-NeoX rotary for this architecture.
    """
    _, factor = rope(config)
    problems = []
    if factor != 0.5:
        problems.append(f"partial_rotary_factor={factor}; vLLM's GlmForCausalLM hard-codes 0.5")
    if (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        problems.append("rope scaling is not 'default'")
    return problems


def load_reference(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The decoder as training saw it: fp32 ``GlmForCausalLM`` in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True).eval()


def write_hf_decoder(src: Path, out: Path, dtype: str, chat_template: str) -> dict[str, Any]:
    """Save the decoder in ``dtype`` with its tokenizer and the thinking chat template; returns its manifest entry."""
    from transformers import AutoTokenizer, GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    model = load_reference(src, DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    tokenizer.chat_template = chat_template
    # Without a generation_config.json in the source, keep the one transformers derived from the model config.
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(str(src))
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    config = read_config(out)
    return {
        "path": out.name,
        "format": "huggingface",
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "quantization": None,
        "consumers": ["transformers.AutoModelForCausalLM", "vllm"],
        "vllm_compatible": not vllm_problems(config),
        "vllm_notes": vllm_problems(config),
    }
