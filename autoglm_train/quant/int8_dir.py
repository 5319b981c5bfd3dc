"""Write a PTQ'd student in the export's ``int8/`` layout, so the export's loader reads it.

The layout is :mod:`autoglm_train.export.int8`'s (``config.json``, ``int8.json``, and
``model.safetensors`` holding each quantized 2-D weight as ``<name>`` int8 + ``<name>_scale``
float32 [out, 1]); the int8 values and scales written are exactly torchao's, i.e. the model that
was measured. ``int8.json`` also records the scheme, so a server re-applies dynamic activations.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn


def int8_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(HF-named tensors to store, names of the int8 ones) of a :func:`quantize_model` output."""
    from autoglm_train.export.int8 import SCALE_SUFFIX

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    sd = model.state_dict(keep_vars=True)
    out: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for key, t in sd.items():
        if key.endswith(".scale") and key[: -len(".scale")] + ".qdata" in sd:
            continue
        if hasattr(t, "qdata"):  # a torchao Int8Tensor parameter
            name, q, scale = key, t.qdata, t.scale
        elif key.endswith(".qdata"):  # Int8PackedLinear buffers
            name, q, scale = key[: -len(".qdata")] + ".weight", t, sd[key[: -len(".qdata")] + ".scale"]
        else:
            out[key] = t.detach().float().contiguous()
            continue
        if tied and name == "lm_head.weight":
            continue  # stored once, as the embedding
        out[name] = q.detach().contiguous()
        out[name + SCALE_SUFFIX] = scale.detach().float().reshape(-1, 1).contiguous()
        quantized.append(name)
    if tied:
        out.pop("lm_head.weight", None)
    return out, sorted(quantized)


def save_int8_dir(model: nn.Module, directory: str | Path, scheme: str, tokenizer=None) -> Path:
    """Write ``model`` (after :func:`~autoglm_train.quant.ptq.quantize_model`) to ``directory``, atomically."""
    from safetensors.torch import save_file

    from autoglm_train.export.int8 import INT8_META, WEIGHTS

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state, quantized = int8_state(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "quantization": "autoglm-int8"})
        model.config.to_json_file(str(tmp / "config.json"))
        meta = {
            "format": "autoglm-int8",
            "version": 1,
            "scheme": "int8 symmetric per output channel (torchao Int8Tensor: scale = max|row|/127.5, [-128, 127])",
            "quant_scheme": scheme,
            "quantized": quantized,
        }
        (tmp / INT8_META).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
