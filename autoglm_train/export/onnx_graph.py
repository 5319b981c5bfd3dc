"""The ``onnx/`` form: the decoder's logits forward as an ONNX graph for onnxruntime (CPU fallback).

``model.onnx`` takes ``input_ids`` int64 [batch, seq] (dynamic) and returns ``logits`` float32
[batch, seq, vocab]; positions are 0..seq-1 and every token attends causally (no padding mask,
no KV cache: each step re-runs the whole sequence, which is the simple, robust CPU path). Weights
are in ``model.onnx.data`` (ONNX external data, raw tensors — not pickle), so graphs over 2 GB work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

ONNX_FILE = "model.onnx"
OPSET = 18
INPUTS = ("input_ids",)
OUTPUTS = ("logits",)


class LogitsOnly(nn.Module):
    """``input_ids -> logits`` with the cache off: the one computation the graph holds."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, use_cache=False).logits


def write_onnx(src: Path, out: Path, max_seq: int | None = None) -> dict[str, Any]:
    """Export the fp32 decoder in ``src`` with ``torch.onnx.export(dynamo=True)``; returns the manifest entry."""
    from autoglm_train.export.hf_dir import load_reference
    from autoglm_train.model.hf_io import read_config

    try:
        import onnxscript  # noqa: F401 - torch's dynamo exporter needs it
    except ImportError as err:
        raise ImportError("the ONNX form needs onnx + onnxscript: pip install 'autoglm-train[export]'") from err
    out.mkdir(parents=True, exist_ok=True)
    config = read_config(src)
    max_seq = max_seq or int(config["max_position_embeddings"])
    model = LogitsOnly(load_reference(src)).eval()
    # batch 2 x seq 3 example: a size-1 example dimension would be specialised to 1 by torch.export.
    example = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.long)
    dynamic = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", max=max_seq)}}
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            verbose=False,
        )
    program.save(str(out / ONNX_FILE), external_data=True)
    return {
        "path": f"{out.name}/{ONNX_FILE}",
        "format": "onnx",
        "dtype": "float32",
        "quantization": None,
        "opset": OPSET,
        "inputs": {"input_ids": "int64 [batch, seq]"},
        "outputs": {"logits": "float32 [batch, seq, vocab]"},
        "kv_cache": False,
        "max_seq": max_seq,
        "consumers": ["onnxruntime"],
    }
