"""Post-training int8 of a trained student, in memory: weight-only or dynamic (torchao).

Decoder-block linears get the scheme's torchao config (:mod:`.schemes`); the vocab head gets
weight-only per-row int8 and the input embedding reads the same int8 matrix when tied (or its
own per-row int8 matrix when not). In a small student the vocabulary is most of the weights, so
leaving it float would keep the model near fp32 size: ``head=False`` shows that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from autoglm_train.quant.int8_modules import Int8Embedding, Int8PackedLinear
from autoglm_train.quant.schemes import check_scheme, head_ptq_config, ptq_config, torchao_quantization
from autoglm_train.utils.aligned import aligned

log = logging.getLogger(__name__)

KERNELS = ("torchao", "int8pack")


@dataclass
class PTQSpec:
    """How a trained student is quantized for serving (``conf/quant/ptq_int8*.yaml``)."""

    scheme: str = "int8_weight_only"
    """``int8_weight_only`` (int8 weights, float activations) or ``int8_dynamic`` (+ per-token int8 activations)."""
    head: bool = True
    """Quantize the vocab head and the input embedding too (per-row int8; one matrix when tied)."""
    kernel: str = "torchao"
    """``torchao`` (its eager kernels, float activations) or ``int8pack``: weight-only linears through
    PyTorch's CPU int8 kernel with bf16 activations (fast decode on CPU)."""
    save: bool = True
    """recipe=distill: write the int8 form next to the student (``student_int8/``)."""
    eval_batches: int = 4
    """recipe=distill: held-out batches on which the int8 model is compared with the float one."""

    def __post_init__(self) -> None:
        check_scheme(self.scheme, "quant.ptq.scheme")
        if self.kernel not in KERNELS:
            raise ValueError(f"quant.ptq.kernel={self.kernel!r}; expected one of {list(KERNELS)}")
        if self.eval_batches < 0:
            raise ValueError(f"quant.ptq.eval_batches={self.eval_batches} must be >= 0")


def _check_float(model: nn.Module) -> None:
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    if any(isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)) for m in model.modules()):
        raise ValueError("quantize_model: the model still has fake-quant modules; call convert_qat(model) first")
    if any(hasattr(p, "qdata") for p in model.parameters()):
        raise ValueError("quantize_model: the model is already quantized")


def quantize_model(model: nn.Module, spec: PTQSpec | None = None) -> dict:
    """Quantize ``model`` (a float causal LM) in place for serving; returns what was quantized.

    Tied head/embedding stay one int8 matrix. ``kernel="int8pack"`` is for CPU only.
    """
    spec = spec or PTQSpec()
    tq = torchao_quantization()
    _check_float(model)
    model.eval()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embed.weight
    blocks = {name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head}
    tq.quantize_(model, ptq_config(spec.scheme), filter_fn=lambda m, fqn: fqn in blocks)
    report = {"scheme": spec.scheme, "linear": len(blocks), "head": spec.head, "tied": tied, "kernel": spec.kernel}
    if spec.head:
        tq.quantize_(head, head_ptq_config())
        dtype = embed.weight.dtype
        model.set_input_embeddings(Int8Embedding(head.weight if tied else embed.weight, dtype=dtype))
    if spec.kernel == "int8pack":
        report["packed"] = pack_weight_only(model)
    log.info(
        "PTQ %s: %d block linears%s, kernel %s",
        spec.scheme,
        len(blocks),
        " + vocab head/embedding (int8 per-row)" if spec.head else " (vocab head/embedding left float)",
        spec.kernel,
    )
    return report


def int8_lookup_embedding(model: nn.Module, dtype: torch.dtype) -> bool:
    """Swap an input embedding whose weight is a torchao ``Int8Tensor`` for :class:`Int8Embedding` (row lookup).

    A model loaded from the int8 form has such an embedding (tied to the head: the same Parameter);
    torchao's embedding op dequantizes the whole [V, H] matrix per call. Returns whether it swapped.
    """
    embed = model.get_input_embeddings()
    if isinstance(embed, Int8Embedding) or not hasattr(embed.weight, "qdata"):
        return False
    model.set_input_embeddings(Int8Embedding(embed.weight, dtype=dtype))
    return True


def pack_weight_only(model: nn.Module) -> int:
    """Swap every weight-only per-row int8 linear for :class:`Int8PackedLinear`; returns how many."""
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"quant.ptq.kernel=int8pack is a CPU kernel; the model is on {sorted(devices)}")
    realign_int8_weights(model)
    swaps = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            weight = getattr(child, "weight", None)
            if not isinstance(child, nn.Linear) or not hasattr(weight, "qdata"):
                continue
            if getattr(weight, "act_quant_kwargs", None) is not None:
                continue  # dynamic-activation layers keep torchao's int8 x int8 path
            packed = Int8PackedLinear.from_linear(child, compute_dtype=torch.bfloat16)
            setattr(module, name, packed)
            swaps += 1
    return swaps


def realign_int8_weights(model: nn.Module) -> int:
    """Move every CPU int8 weight's ``qdata`` and ``scale`` into 64-byte aligned storage; returns how many moved.

    A weight loaded from a safetensors file lies 8-byte aligned, and the int8pack kernel faults on it on AVX-512
    hosts (:mod:`autoglm_train.utils.aligned`). The Parameter is changed in place, so a head and an embedding
    tied to it keep reading one matrix.
    """
    moved = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or not hasattr(param, "qdata") or param.device.type != "cpu":
            continue
        seen.add(id(param))
        qdata, scale = aligned(param.qdata), aligned(param.scale)
        if qdata is not param.qdata or scale is not param.scale:
            param.qdata, param.scale = qdata, scale
            moved += 1
    return moved
