"""One chunk of logits through a vocab head: float32, the shared vocabulary, a too-narrow head refused.

Shared by the loss's two paths (:mod:`.kd_loss` recomputes chunks, :mod:`.fused_kd` fuses their
gradient) and by validation (:mod:`.teacher_agreement`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from autoglm_train.distill.chunk_buffers import ChunkBuffers

Head = Callable[[Tensor], Tensor]


def upcast(x: Tensor) -> Tensor:
    """Half-precision logits to float32: log_softmax over 100k+ columns loses too much in bf16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def slice_vocab(logits: Tensor, vocab_size: int | None, who: str) -> Tensor:
    """Keep the real vocab columns: teachers pad their head, students may reserve extra rows."""
    if vocab_size is None:
        return logits
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"{who} head gives {logits.shape[-1]} logits, fewer than vocab_size={vocab_size}")
    return logits[..., :vocab_size]


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def teacher_logits(
    t_hidden: Tensor, teacher_head: Head, vocab_size: int | None, width: int, buffers: ChunkBuffers | None = None
) -> Tensor:
    """The teacher's float32 logits on the shared vocabulary for one chunk; refuses a width the student lacks.

    With ``buffers`` and a plain linear head, only the shared rows of its weight are multiplied, into a reused buffer.
    """
    if buffers is not None and fusable(teacher_head):
        weight = slice_vocab(teacher_head.weight.t(), vocab_size, "teacher").t()  # the shared rows, same refusal
        bias = teacher_head.bias
        t_logits = buffers.logits("teacher_logits", t_hidden, weight, None if bias is None else bias[: len(weight)])
    else:
        t_logits = slice_vocab(upcast(teacher_head(t_hidden)), vocab_size, "teacher")
    if t_logits.shape[-1] != width:
        raise ValueError(
            f"teacher gives {t_logits.shape[-1]} logits and student {width}; pass "
            "vocab_size to compare only the shared real vocabulary"
        )
    return t_logits


def fusable(head: Head) -> bool:
    """A plain ``nn.Linear`` with its whole weight on hand: the fused path reads the weight directly.

    Anything else (a fake-quant head under QAT, a ZeRO-3 partitioned weight that only the module's own hooks gather)
    goes through the module call with per-chunk recomputation instead.
    """
    return type(head) is nn.Linear and not hasattr(head.weight, "ds_id")
