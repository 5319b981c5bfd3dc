"""The server's decoder: float, or ``--quantize int8`` with the fastest correct int8 kernel for the device.

- CPU: PyTorch's weight-only ``int8pack`` kernel (``aten._weight_int8pack_mm``, bf16 activations,
  :class:`~autoglm_train.quant.int8_modules.Int8PackedLinear`). torchao's eager CPU path converts every
  weight to float on every call and decodes slower than fp32; int8pack reads the int8 weight directly.
- CUDA: torchao's ``Int8Tensor`` weight-only linears (the kernels torchao maintains for GPUs).

Either way the tied vocab head and the input embedding stay one int8 matrix (the embedding does a row
lookup in it, :class:`~autoglm_train.quant.int8_modules.Int8Embedding`), so the vocabulary is held once.

Weights come from the bundle's standard ``int8/`` form when it has one (the directory transformers loads
alone, :mod:`autoglm_train.export.int8`), so the server runs exactly the int8 numbers the export verified;
otherwise the float ``decoder/`` is quantized in memory with the same torchao scheme.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from autoglm_train.engine.bundle import BundleInfo
from autoglm_train.engine.head import store_transposed

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("int8",)


def load_serving_decoder(
    bundle: BundleInfo, device: str, dtype: str, quantize: str | None
) -> tuple[nn.Module, torch.dtype, str | None]:
    """The bundle's decoder, ready to serve.

    Args:
        bundle: what :func:`~autoglm_train.engine.bundle.read_bundle` found.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``; ``auto`` with several
            GPUs splits the layers across them (``device_map="auto"``).
        dtype: ``auto`` (float32 on CPU, the checkpoint's dtype on GPU) or ``float32``/``bfloat16``/``float16``.
        quantize: None for the float decoder, ``"int8"`` for weight-only int8.

    Returns:
        ``(decoder in eval mode, its float dtype, a one-line description of the quantization or None)``.
    """
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}; expected None or one of {list(QUANTIZE)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
    device, device_map, torch_dtype = _placement(bundle.decoder_dir, device, dtype)
    on_cpu = torch.device(device).type == "cpu"
    if quantize is None:
        decoder = _from_pretrained(bundle.decoder_dir, torch_dtype, device_map)
        store_transposed(decoder)  # the CPU fp32 head's fast layout (serve/head.py); a no-op elsewhere
        return decoder, torch_dtype, None

    from autoglm_train.quant.int8_layout import load_int8
    from autoglm_train.quant.int8_modules import Int8PackedLinear
    from autoglm_train.quant.ptq import PTQSpec, quantize_model

    kernel = "int8pack" if on_cpu else "torchao"
    int8_dir = standard_int8_dir(bundle)
    if int8_dir is not None:
        decoder = load_int8(int8_dir, torch_dtype, kernel=kernel, device_map=device_map)
        packed = sum(isinstance(m, Int8PackedLinear) for m in decoder.modules())
        source = f"weights from the bundle's {int8_dir.name}/ (TorchAoConfig)"
    else:
        decoder = _from_pretrained(bundle.decoder_dir, torch_dtype, device_map)
        packed = quantize_model(decoder, PTQSpec(kernel=kernel)).get("packed", 0)
        source = f"quantized at start-up from {bundle.decoder_dir.name}/ (the bundle has no int8 form)"
    tied = _vocab_shared(decoder)
    if kernel == "int8pack":
        how = f"int8pack CPU kernel (aten._weight_int8pack_mm, bf16 activations) on {packed} linears"
    else:
        how = "torchao Int8Tensor linears (CUDA)"
    vocab = "tied vocab head/embedding: one int8 matrix" if tied else "vocab head and embedding int8"
    description = f"int8 weight-only: {how}; {vocab}; {source}"
    log.info("--quantize int8: %s", description)
    return decoder.eval(), torch_dtype, description


def standard_int8_dir(bundle: BundleInfo) -> Path | None:
    """The bundle's int8 form when it is the standard one transformers loads alone, else None.

    The manifest's ``forms.int8.path`` is looked up first, then ``<bundle>/int8``
    (:func:`~autoglm_train.quant.int8_layout.is_standard_int8` decides what counts).
    """
    from autoglm_train.quant.int8_layout import is_standard_int8

    entry = ((bundle.manifest or {}).get("forms") or {}).get("int8") or {}
    candidates = [bundle.root / entry["path"]] if isinstance(entry.get("path"), str) else []
    candidates.append(bundle.root / "int8")
    return next((c for c in candidates if is_standard_int8(c)), None)


def _placement(decoder_dir: Path, device: str, dtype: str) -> tuple[str, str | None, torch.dtype]:
    """``(device, device_map, float dtype)``; device_map loads weights straight onto the GPU(s), never
    staging a copy in CPU memory."""
    gpus = torch.cuda.device_count()
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    on_cpu = torch.device(device).type == "cpu"
    if dtype == "auto":
        config = json.loads((decoder_dir / "config.json").read_text())
        saved = str(config.get("dtype") or config.get("torch_dtype"))
        torch_dtype = torch.float32 if on_cpu else DTYPES.get(saved, torch.bfloat16)
    else:
        torch_dtype = DTYPES[dtype]
    device_map = None if on_cpu else ("auto" if device == "cuda" and gpus > 1 else device)
    return device, device_map, torch_dtype


def _from_pretrained(directory: Path, torch_dtype: torch.dtype, device_map: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch_dtype, device_map=device_map, use_safetensors=True
    )
    return model.eval()


def _vocab_shared(model: nn.Module) -> bool:
    """Whether the head and the input embedding read one int8 matrix (checked, not assumed)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_q = getattr(head, "qdata", None)
    if head_q is None:
        head_q = getattr(head.weight, "qdata", None)
    embed_w = getattr(embed, "weight", None)
    embed_q = getattr(embed_w, "qdata", None) if embed_w is not None else getattr(embed, "qdata", None)
    return head_q is not None and embed_q is not None and head_q.data_ptr() == embed_q.data_ptr()
