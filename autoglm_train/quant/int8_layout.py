"""The int8 form on disk: one standard layout, written by PTQ (``student_int8/``) and by the export (``int8/``).

A Hugging Face directory that transformers loads alone (torchao installed), weights int8 in memory::

    AutoModelForCausalLM.from_pretrained("outputs/distill/student_int8")   # or "bundle/int8"

- ``config.json``: the decoder's config plus a ``quantization_config`` for transformers' ``TorchAoConfig``
  (:func:`torchao_config`: per-row int8 weights, the vocabulary included; ``int8_dynamic`` adds per-token
  int8 activations to the decoder blocks);
- ``model.safetensors``: torchao's safetensors layout (each int8 weight ``W`` as ``<module>._weight_qdata``
  int8 [out, in] + ``_weight_scale`` float32 [out, 1] + ``_weight_zero_point``, the tensor types in the file's
  metadata), plus one metadata entry of ours, ``autoglm_int8`` (:func:`read_record`): the scheme and the
  sha256 of the float decoder it was quantized from, so an export can reuse the file PTQ measured;
- the tokenizer, chat template and generation config of ``tokenizer_dir``.

Why written here rather than with ``from_pretrained(quantization_config=TorchAoConfig(...)).save_pretrained``:
transformers' torchao quantizer skips a tied embedding (it quantizes ``lm_head``, finds it tied, and saves the
embedding in float32), so the vocabulary — most of a small student's weights — would stay float. Here every
2-D weight is quantized by torchao's own config handler, one tensor at a time (memory stays at the int8
model), the tied head is stored once as the int8 embedding, and transformers re-ties it on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoglm_train.model.hf_io import HF_FILES, iter_tensors, read_config
from autoglm_train.quant.schemes import check_scheme, head_ptq_config, ptq_config

WEIGHTS = "model.safetensors"
RECORD = "autoglm_int8"  # no dot: transformers reads dotted metadata keys as tensor names
VERSION = 1
QUANT_METHOD = "torchao"
LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
SCHEME = (
    "weight-only int8, symmetric, per output channel (row), float32 scales (torchao Int8Tensor: "
    "scale = max|row| / 127.5, range [-128, 127]); tied vocab head stored once; norms/biases float32"
)
PTQ_DIR = "student_int8"
"""Where ``recipe=distill`` writes the int8 form it measured: next to its ``student/``."""
SERVED = {"scheme": "int8_weight_only", "head": True}
"""What the bundle's ``int8/`` holds and the server runs: a ``student_int8/`` written so is reusable as-is."""


def torchao_config(scheme: str = "int8_weight_only", head: bool = True, hf_config=None):
    """The ``TorchAoConfig`` recorded in ``config.json``.

    ``int8_weight_only`` with the head is one ``Int8WeightOnlyConfig(PerRow())`` for every linear and the
    embedding. Otherwise the decoder blocks and the vocabulary differ, so an ``FqnToConfig`` names them (the
    module names come from ``hf_config``'s model built on the meta device).
    """
    from transformers import TorchAoConfig

    check_scheme(scheme)
    if scheme == "int8_weight_only":
        return TorchAoConfig(ptq_config(scheme), include_input_output_embeddings=head, untie_embedding_weights=False)
    from torchao.quantization import FqnToConfig

    vocab, blocks = _modules(hf_config)
    prefix = os.path.commonprefix(sorted(blocks))  # noqa: RUF071 - a string prefix for a regex, not a path
    fqns = {"re:" + re.escape(prefix) + ".*": ptq_config(scheme)}
    if head:
        fqns.update({name: head_ptq_config() for name in vocab})
    if any(name.startswith(prefix) for name in vocab):
        raise ValueError(f"int8 form: the vocab modules {vocab} share the block prefix {prefix!r}")
    return TorchAoConfig(FqnToConfig(fqns), include_input_output_embeddings=head, untie_embedding_weights=False)


def is_standard_int8(directory: str | Path) -> bool:
    """Whether ``directory`` holds the form transformers loads alone (a torchao ``quantization_config``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    quant = json.loads(path.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD


def source_record(src: str | Path) -> dict[str, str | None]:
    """The float decoder an int8 form is made from, by content: sha256 of its config and weight files."""
    from autoglm_train.model.pin import config_sha256, weights_sha256

    return {"config_sha256": config_sha256(src), "weights_sha256": weights_sha256(src)}


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """The ``autoglm_int8`` record of an int8 form (scheme, head, source hashes), or None if it has none."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS
    if not is_standard_int8(directory) or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(RECORD)
    return json.loads(raw) if raw else None


def write_int8(
    src: Path,
    out: Path,
    tokenizer_dir: Path | None = None,
    scheme: str = "int8_weight_only",
    head: bool = True,
) -> dict[str, Any]:
    """Quantize the fp32 decoder in ``src`` into ``out``; returns the form's manifest entry.

    Args:
        src: the fp32 HF decoder directory training wrote.
        out: the directory to create (``student_int8/`` or a bundle's ``int8/``).
        tokenizer_dir: where the tokenizer, chat template and generation config to ship come from; None ships
            none (the form then loads, but has no tokenizer of its own).
        scheme: ``int8_weight_only`` or ``int8_dynamic`` (:mod:`.schemes`); the vocabulary is always weight-only.
        head: quantize the vocab head and the input embedding too (one int8 matrix when tied).
    """
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(src))
    hf_quant = torchao_config(scheme, head, hf_config)  # first: without torchao this names the extra to install
    record = {"version": VERSION, "scheme": scheme, "head": head, "source": source_record(src)}
    out.mkdir(parents=True, exist_ok=True)
    state = _quantized_state(src, hf_config, scheme, head)
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(tensors, str(out / WEIGHTS), metadata={**metadata, "format": "pt", RECORD: json.dumps(record)})
    hf_config.quantization_config = hf_quant
    hf_config.save_pretrained(str(out))
    copy_tokenizer(tokenizer_dir, out)
    return manifest_entry(out, tokenizer=tokenizer_dir is not None)


def manifest_entry(form: Path, tokenizer: bool = True) -> dict[str, Any]:
    """The bundle manifest's entry for the int8 form in ``form``, read from its record and weights file."""
    from safetensors import safe_open

    record = read_record(form)
    if record is None:
        raise ValueError(f"{form}: not an int8 form written by write_int8 (no {RECORD} record)")
    scheme, head = record["scheme"], record["head"]
    with safe_open(str(form / WEIGHTS), framework="pt") as f:
        quantized = sum(1 for key in f.keys() if key.endswith("._weight_qdata"))  # noqa: SIM118
    served = {"scheme": scheme, "head": head} == SERVED
    blocks = "Int8WeightOnlyConfig" if scheme == "int8_weight_only" else "Int8DynamicActivationInt8WeightConfig"
    vocab = "embeddings included" if head else "embeddings float"
    return {
        "path": form.name,
        "format": "huggingface-torchao",
        "dtype": "int8",
        "quantization": SCHEME if served else f"{scheme}, vocab int8: {head}",
        "quantization_config": f"TorchAoConfig({blocks}(granularity=PerRow()){'' if served else ' for the blocks'}, "
        f"{vocab})",
        "quantized_tensors": quantized,
        "source": record["source"],
        "loader": LOADER,
        "requires": ["transformers", "torchao"],
        "tokenizer": form.name if tokenizer else "decoder",
    }


def copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    """The tokenizer, chat template and generation config of ``tokenizer_dir``, copied into ``out``."""
    if tokenizer_dir is None:
        return
    for name in HF_FILES:
        if name != "config.json" and (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)


def load_int8(
    directory: str | Path, dtype: torch.dtype = torch.float32, kernel: str | None = None, device_map: str | None = None
) -> nn.Module:
    """An int8 form loaded by transformers alone, in eval mode; weights stay int8 and compute in ``dtype``.

    The one reader of the form: PTQ's measurement, the pipeline's compare and the server all load through it.

    Args:
        directory: a ``student_int8/`` or a bundle's ``int8/``.
        dtype: float dtype of the non-int8 tensors.
        kernel: None for the model exactly as transformers builds it; ``torchao`` or ``int8pack``
            (:class:`~autoglm_train.quant.ptq.PTQSpec`) for the inference modules PTQ and the server use
            (the embedding as a row lookup in the int8 matrix; ``int8pack``: the CPU int8 matmul kernel).
        device_map: transformers' ``device_map`` (a GPU server loads the weights straight onto its devices).
    """
    from transformers import AutoModelForCausalLM

    from autoglm_train.quant.ptq import KERNELS, int8_lookup_embedding, pack_weight_only

    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; expected None or one of {list(KERNELS)}")
    if not is_standard_int8(directory):
        raise FileNotFoundError(
            f"{directory}: not an int8 form (no config.json with a torchao quantization_config); write one with "
            "`python train.py recipe=distill quant=ptq_int8` or the export's int8/ form"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, device_map=device_map, use_safetensors=True
    ).eval()
    retarget_int8_dtype(model, dtype)
    if kernel is not None:
        int8_lookup_embedding(model, dtype)
    if kernel == "int8pack":
        pack_weight_only(model)
    return model


def retarget_int8_dtype(model: nn.Module, torch_dtype: torch.dtype) -> None:
    """Make each int8 weight compute in ``torch_dtype``: the form records the fp32 it was made from, and a
    bf16 server would otherwise multiply bf16 activations by fp32 dequantized weights."""
    from torchao.quantization import Int8Tensor

    retyped: dict[int, nn.Parameter] = {}  # one new Parameter per old one: a tied head and embedding stay tied
    for module in list(model.modules()):
        weight = module._parameters.get("weight")
        if weight is None or not isinstance(weight.data, Int8Tensor) or weight.dtype == torch_dtype:
            continue
        if id(weight) not in retyped:
            w = weight.data
            new = Int8Tensor(w.qdata, w.scale, w.block_size, torch_dtype, zero_point=w.zero_point)
            retyped[id(weight)] = nn.Parameter(new, requires_grad=False)
        module.weight = retyped[id(weight)]


def _modules(hf_config) -> tuple[list[str], set[str]]:
    """(vocab module names: embedding and head, block linear names) of the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    vocab = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)]
    modules = dict(model.named_modules())
    return [n for n in names if id(modules[n]) in vocab], {n for n in names if id(modules[n]) not in vocab}


def _quantized_state(src: Path, hf_config, scheme: str, head: bool) -> dict[str, torch.Tensor]:
    """Every tensor of ``src``, each 2-D weight quantized under its module's config; the tied head skipped."""
    vocab, blocks = _modules(hf_config)
    configs = {f"{n}.weight": ptq_config(scheme) for n in blocks}
    if head:
        configs.update({f"{n}.weight": head_ptq_config() for n in vocab})
    tied = bool(read_config(src).get("tie_word_embeddings"))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(src):
        if tied and name == "lm_head.weight":
            continue  # the tied head is the embedding; stored once, re-tied by transformers on load
        if name in configs and tensor.is_floating_point():
            state[name] = _quantize_weight(tensor.float(), configs[name])
        else:
            state[name] = tensor.float().contiguous()
    return state


def _quantize_weight(weight: torch.Tensor, config) -> nn.Parameter:
    """``weight`` [out, in] as torchao quantizes an ``nn.Linear`` under ``config`` (its handler, not a copy of it)."""
    from torchao.quantization import quantize_

    with torch.device("meta"):
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    holder.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config)
    return holder.weight
