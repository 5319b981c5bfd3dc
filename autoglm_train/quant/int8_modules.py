"""Two small int8 inference modules torchao has no eager CPU path for.

- :class:`Int8Embedding`: row lookup in an int8 matrix (torchao's ``Int8Tensor`` embedding
  dequantizes the whole [V, H] matrix per call). With tied weights it reads the head's int8
  matrix, so the vocabulary is stored once.
- :class:`Int8PackedLinear`: weight-only int8 matmul through PyTorch's ``_weight_int8pack_mm``
  CPU kernel (the one gpt-fast uses), which reads the int8 weight directly; torchao's eager
  weight-only path converts the whole weight to float on every call and is slower than fp32.
  The kernel takes bf16 (or fp16) activations, so outputs carry bf16 rounding. It is a matrix-
  vector kernel: for many rows at once (prefill) dequantizing to bf16 and one GEMM is faster.
  Its weight and scales are held 64-byte aligned (:mod:`autoglm_train.utils.aligned`): on AVX-512 the
  kernel faults on a weight as it lies in a safetensors file (8-byte aligned), taking the process down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_train.utils.aligned import aligned


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(qdata int8 [N, K], scale float32 [N])`` of a per-row int8 weight (torchao ``Int8Tensor`` or float)."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if qdata is None or scale is None:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        t = Int8Tensor.from_hp(weight.detach(), PerRow())
        qdata, scale = t.qdata, t.scale
    zero_point = getattr(weight, "zero_point", None)
    if zero_point is not None and bool(zero_point.any()):
        raise ValueError("int8_rows: asymmetric weights are not supported (symmetric per-row only)")
    if scale.numel() != qdata.shape[0]:
        raise ValueError(f"int8_rows: expected one scale per row, got {tuple(scale.shape)} for {tuple(qdata.shape)}")
    return qdata, scale.reshape(-1).float()


class Int8Embedding(nn.Module):
    """``nn.Embedding`` over a per-row int8 matrix: ``E[ids] = q[ids] · scale[ids]``.

    Args:
        weight: the int8 weight as a Parameter holding a torchao ``Int8Tensor`` (shared with a
            tied head) or a float matrix (quantized here, per row).
        dtype: dtype of the returned embeddings.
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not (isinstance(weight, nn.Parameter) and hasattr(weight, "qdata")):
            # an untied float matrix: quantized here into the same Int8Tensor a tied head would hold, so every
            # Int8Embedding has a ``weight`` Parameter (its device, state_dict name and bytes are the usual ones)
            from torchao.quantization.granularity import PerRow
            from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

            weight = nn.Parameter(Int8Tensor.from_hp(weight.detach(), PerRow()), requires_grad=False)
        int8_rows(weight)  # refuses asymmetric or non-per-row weights up front
        self.weight = weight  # registered, so state_dict and weight_bytes see the (possibly shared) matrix
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = (weight.shape[0], weight.shape[1])

    @property
    def qdata(self) -> Tensor:
        """The int8 matrix [V, H] (shared with a tied head)."""
        return self.weight.qdata

    @property
    def scale(self) -> Tensor:
        """One float32 scale per row [V]."""
        return self.weight.scale.reshape(-1)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qdata).to(self.dtype) * self.scale[ids].unsqueeze(-1).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


PACKED_MAX_ROWS = 16
"""Above this many rows (tokens) per call the dequantize + GEMM path is faster than the int8 kernel."""


class Int8PackedLinear(nn.Module):
    """Weight-only int8 linear on CPU via ``torch._weight_int8pack_mm`` (activations in ``compute_dtype``).

    Args:
        qdata: int8 weight [N, K].
        scale: per-row scale [N].
        bias: optional float bias [N].
        compute_dtype: activation dtype of the kernel (bf16 or fp16); the output is cast back.
    """

    def __init__(
        self, qdata: Tensor, scale: Tensor, bias: Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        if compute_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"Int8PackedLinear: compute_dtype must be bfloat16 or float16, got {compute_dtype}")
        # aligned: the kernel faults on AVX-512 otherwise (utils/aligned.py); a no-op for what is already aligned,
        # so a tied embedding that reads the same (realigned) matrix keeps sharing it
        self.register_buffer("qdata", aligned(qdata))
        self.register_buffer("scale", aligned(scale.reshape(-1).to(compute_dtype)))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = qdata.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Int8PackedLinear:
        qdata, scale = int8_rows(linear.weight)
        return cls(qdata, scale, linear.bias, compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        if x2.shape[0] <= PACKED_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2, self.qdata, self.scale)
        else:
            # int8 values are exact in bf16/fp16; the scale goes on the [rows, N] output, not the [N, K] weight:
            # half the passes over the weight (prefill of a 1B decoder: 88 -> 48 ms per 5632x2048 layer at 192 rows)
            y = F.linear(x2, self.qdata.to(self.compute_dtype)) * self.scale
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, {self.compute_dtype}"
