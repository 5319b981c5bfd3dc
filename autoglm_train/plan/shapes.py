"""Parameter counts of the student, the teacher and the plugins, from the real modules built on the meta device.

Nothing is allocated: a 9B decoder is built on ``torch.device("meta")`` and only its parameters' shapes are read,
so the plan (:mod:`autoglm_train.plan`) runs in seconds on a laptop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
# Teachers known by name (shapes of public configs); anything else: a config.json path or an HF model dir.
BUILTIN_TEACHERS = {
    "glm4-9b": "model/autoglm_phone_9b.yaml",  # GLM-4-9B text shape: the same 151,552-token tokenizer as the student
}


@dataclass
class Shape:
    """What the memory formulas need from a decoder."""

    name: str
    params: int
    groups: dict[str, int]
    """embeddings / attention / mlp / norms / lm_head (tied heads count under embeddings only)."""
    largest_layer: int
    """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``): embeddings or head."""
    per_layer: int
    root_unit: int
    """Parameters outside the decoder layers (FSDP2's root unit)."""
    hidden: int
    kv_hidden: int
    ffn: int
    layers: int
    vocab: int
    linear_params: int = 0
    """Parameters in the decoder layers' Linear weights (what int8 loading quantizes)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _group(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def shape_of(model: torch.nn.Module, name: str) -> Shape:
    """Counts of a transformers causal LM (any device, meta included); tied weights counted once."""
    cfg = model.config
    seen: set[int] = set()
    groups = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head"), 0)
    linear = 0
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = _group(pname)
        groups[g] = groups.get(g, 0) + p.numel()
        if g in ("attention", "mlp") and pname.endswith(".weight"):
            linear += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    backbone = getattr(model, model.base_model_prefix)
    per_layer = sum(p.numel() for p in backbone.layers[0].parameters())
    total = sum(groups.values())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(
        name=name,
        params=total,
        groups={k: v for k, v in groups.items() if v or k != "other"},
        largest_layer=largest,
        per_layer=per_layer,
        root_unit=total - per_layer * cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        kv_hidden=cfg.num_key_value_heads * head_dim,
        ffn=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size,
        linear_params=linear,
    )


def _meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def student_shape(model: str = "autoglm_phone_9b", tokenizer_size: int = 151552) -> Shape:
    """The student decoder of ``conf/model/<model>.yaml`` (or a yaml path), built on the meta device."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from autoglm_train.model.decoder import build_decoder

    path = Path(model) if model.endswith(".yaml") else REPO_CONF / "model" / f"{model}.yaml"
    spec = instantiate(OmegaConf.load(path))
    decoder = build_decoder(spec, tokenizer_size, pad_token_id=0, device="meta")
    return shape_of(decoder, spec.name)


def teacher_shape(teacher: str) -> Shape:
    """A teacher by built-in name (``glm4-9b``), ``config.json`` path, or HF model directory (offline)."""
    if teacher in BUILTIN_TEACHERS:
        shape = student_shape(str(REPO_CONF / BUILTIN_TEACHERS[teacher]))
        shape.name = teacher
        return shape
    from transformers import AutoConfig

    path = Path(teacher).expanduser()
    if path.is_file():
        config = AutoConfig.for_model(**json.loads(path.read_text()))
    elif path.is_dir():
        config = AutoConfig.from_pretrained(path)
    else:
        raise FileNotFoundError(
            f"teacher {teacher!r}: not a built-in ({', '.join(BUILTIN_TEACHERS)}), config.json or model directory"
        )
    return shape_of(_meta_model(config), path.parent.name if path.is_file() else path.name)


def plugin_params(names: Sequence[str], hidden_size: int) -> dict[str, int]:
    """Encoder + projector + gate parameters of each ``conf/plugin/<name>.yaml`` at the decoder's width."""
    from omegaconf import OmegaConf

    from autoglm_train.model.registry import instantiate_plugin

    out = {}
    for name in names:
        cfg = OmegaConf.load(REPO_CONF / "plugin" / f"{name}.yaml")
        cfg = OmegaConf.merge(cfg, {"hidden_size": hidden_size})
        with torch.device("meta"):
            plugin = instantiate_plugin(cfg)
        out[name] = sum(p.numel() for p in plugin.parameters())
    return out
