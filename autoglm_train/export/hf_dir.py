"""The ``decoder/`` form: a plain Hugging Face GLM directory in fp32, fp16 or bf16.

Loads in ``transformers.AutoModelForCausalLM`` with no project code, and is laid out the way
vLLM's ``GlmForCausalLM`` expects. The reading helpers here (config, tensors) are shared by the
other forms, which all convert from the fp32 source so that no form rounds twice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ARCHITECTURE = "GlmForCausalLM"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a Hugging Face decoder directory (save_hf_decoder)")
    return json.loads(path.read_text())


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


def weight_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (pickled .bin checkpoints are not read)")
    return files


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every weight, one at a time from memory-mapped safetensors."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` without reading any tensor data."""
    from safetensors import safe_open

    shapes = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                sl = f.get_slice(name)
                shapes[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


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
