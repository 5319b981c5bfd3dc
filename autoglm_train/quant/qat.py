"""Quantization-aware distillation: the student trains under int8 fake-quant, the teacher stays float.

``prepare_qat`` swaps the student's linear layers (and its vocab head / input embedding) for
torchao's fake-quant modules before ``trainer.fit``; ``convert_qat`` swaps them back afterwards, so
the saved student is a plain float HF checkpoint whose weights learned to survive int8 rounding,
and :func:`autoglm_train.quant.ptq.quantize_model` with the same scheme makes the int8 form.

The fake-quant modules keep the student's very ``Parameter`` objects and add no parameters or
buffers (torchao's per-row/per-token qparams are recomputed each forward and held as plain
attributes), so ``state_dict`` keys, optimizer state, tied weights and the safetensors
checkpoints are exactly those of the float student: a run resumes across prepare/convert.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from autoglm_train.quant.head_fake_quant import OncePerForwardFakeQuant, attach_refresh_hook
from autoglm_train.quant.schemes import (
    activation_fake_quant_config,
    check_scheme,
    torchao_quantization,
    weight_fake_quant_config,
)

log = logging.getLogger(__name__)

_HOOK = "_autoglm_qat_hook"


@dataclass
class QATSpec:
    """What the student is fake-quantized to while it distills (``conf/quant/qat_int8.yaml``)."""

    scheme: str = "int8_dynamic"
    """``int8_dynamic`` (int8 weights + per-token int8 activations) or ``int8_weight_only``."""
    head: bool = True
    """Also fake-quantize the vocab head and the input embedding (per-row int8 weights), as PTQ quantizes them."""
    start_step: int = 0
    """Optimizer step at which fake-quant switches on; before it the student trains in float."""

    def __post_init__(self) -> None:
        check_scheme(self.scheme, "quant.qat.scheme")
        if self.start_step < 0:
            raise ValueError(f"quant.qat.start_step={self.start_step} must be >= 0")


def _block_linears(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def prepare_qat(model: nn.Module, spec: QATSpec) -> dict[str, int]:
    """Swap ``model``'s layers for fake-quant ones, in place; returns how many of each were swapped."""
    tq = torchao_quantization()
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    if hasattr(model, _HOOK):
        raise RuntimeError("prepare_qat: the model is already prepared")
    act, weight = activation_fake_quant_config(spec.scheme), weight_fake_quant_config()
    blocks = set(_block_linears(model))
    tq.quantize_(
        model,
        QATConfig(activation_config=act, weight_config=weight, step="prepare"),
        filter_fn=lambda m, fqn: fqn in blocks,
    )
    counts = {"linear": len(blocks), "head": 0, "embedding": 0}
    if spec.head:
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head.weight is embed.weight
        fq_head = FakeQuantizedLinear.from_linear(head, None, weight)
        head_q = OncePerForwardFakeQuant(fq_head.weight_fake_quantizer, fq_head)
        fq_head.weight_fake_quantizer = head_q
        model.set_output_embeddings(fq_head)
        quantizers = [head_q]
        fq_embed = FakeQuantizedEmbedding.from_embedding(embed, weight)
        if tied:
            fq_embed.weight_fake_quantizer = head_q  # one int8 matrix: quantized once, read by both
        else:
            embed_q = OncePerForwardFakeQuant(fq_embed.weight_fake_quantizer, fq_embed)
            fq_embed.weight_fake_quantizer = embed_q
            quantizers.append(embed_q)
        model.set_input_embeddings(fq_embed)
        if tied:  # torchao leaves meta-device weights behind (FSDP2's ranks > 0 build on meta): tie the new ones
            fq_head.weight = fq_embed.weight
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError("prepare_qat broke the tied embedding / head")
        handle = attach_refresh_hook(getattr(model, model.base_model_prefix), quantizers)
        counts.update(head=1, embedding=1)
    else:
        handle = None
    object.__setattr__(model, _HOOK, handle)
    log.info(
        "QAT (%s): fake-quant on %d linear layers%s",
        spec.scheme,
        counts["linear"],
        " + vocab head + input embedding (int8 per-row weights)" if spec.head else "",
    )
    return counts


def fake_quant_modules(model: nn.Module) -> list[nn.Module]:
    """Every fake-quantizer in ``model`` (weight and activation; ``modules()`` lists a shared one once)."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    return [m for m in model.modules() if isinstance(m, (FakeQuantizerBase, OncePerForwardFakeQuant))]


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every fake-quantizer of a prepared model on or off (off = the float student)."""
    for m in fake_quant_modules(model):
        m.enabled = enabled


def is_prepared(model: nn.Module) -> bool:
    return hasattr(model, _HOOK)


def convert_qat(model: nn.Module) -> nn.Module:
    """Swap the fake-quant modules back to ``nn.Linear`` / ``nn.Embedding`` (same Parameters), in place.

    The result is the plain float student (tied weights still tied); quantize it for serving with
    :func:`autoglm_train.quant.ptq.quantize_model` and the scheme it was trained for.
    """
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    if not is_prepared(model):
        raise RuntimeError("convert_qat: the model was not prepared with prepare_qat")
    handle = getattr(model, _HOOK)
    if handle is not None:
        handle.remove()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FakeQuantizedLinear):
                setattr(module, child_name, child.to_linear())
            elif isinstance(child, FakeQuantizedEmbedding):
                setattr(module, child_name, child.to_embedding())
    object.__delattr__(model, _HOOK)
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("convert_qat broke the tied embedding / head")
    return model
