"""The vocabulary head the engine applies to the decoder body's last hidden states.

Why not simply the decoder's own ``lm_head`` on CPU: PyTorch's fp32 ``F.linear`` (MKL, weight stored
[V, H]) reads the head's weight at about a third of the bandwidth ``hidden @ W_T`` reaches with the
weight stored transposed ([H, V], contiguous). Measured on the 2-core AVX2 EPYC this project is
tested on, vocabulary 49,216 x hidden 256, one thread: 5.9 -> 2.4 ms at one row, 16.2 -> 12.8 ms at
16 rows. The head is most of a small decoder's decode step, so a served request decodes up to
1.6x faster. The transposed matrix is the only copy: :func:`store_transposed` re-points a tied
input embedding at its transpose (a strided row lookup, a few rows per step), so serving holds the
vocabulary once, as before.

Held-out evaluation (:meth:`Engine.in_process`) and the server take their logits from this same
function, so what evaluation measured is what the server answers, to the last bit.
GPUs, int8 heads and non-float dtypes keep the module's own forward.
The transposed matrix is a copy this process made (64-byte aligned, :mod:`autoglm_train.utils.aligned`),
never the loaded file's storage. MKL's GEMM takes any alignment, so the fp32 head had no fault to fix (checked
for the AVX-512 int8pack crash); :func:`aligned` only makes the assumption explicit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from autoglm_train.utils.aligned import aligned


def body_of(decoder: nn.Module) -> nn.Module:
    """The decoder without its head (``GlmForCausalLM.model``): returns hidden states, not logits."""
    return getattr(decoder, decoder.base_model_prefix)


def _transposable(head: nn.Module | None) -> bool:
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and isinstance(weight, Tensor)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


def store_transposed(decoder: nn.Module) -> bool:
    """Store a CPU fp32 head (and the input embedding tied to it) as one [H, V]-contiguous matrix; True if done.

    The module tree and the weight's [V, H] shape are unchanged (``weight`` becomes a transposed view), so
    every other reader (``F.linear``, ``F.embedding``, ``state_dict``) still works; only the layout differs.
    """
    head, embed = decoder.get_output_embeddings(), decoder.get_input_embeddings()
    if not _transposable(head):
        return False
    weight = head.weight
    shared = nn.Parameter(aligned(weight.detach().t()).t(), requires_grad=False)
    head.weight = shared
    if embed is not None and embed.weight is weight:
        embed.weight = shared
    return True


class TransposedHead:
    """``hidden @ weight_t`` with ``weight_t`` [H, V] contiguous (see the module docstring for why)."""

    def __init__(self, weight_t: Tensor) -> None:
        self.weight_t = weight_t

    def __call__(self, hidden: Tensor) -> Tensor:
        return hidden @ self.weight_t


def vocab_head(decoder: nn.Module) -> Callable[[Tensor], Tensor]:
    """``hidden [..., H] -> logits [..., V]`` computed as the engine computes them (see the module docstring).

    A CPU fp32 head whose weight is not stored transposed (a training model evaluated in process) is
    copied once into that layout here; the copy lives as long as the returned head.
    """
    head = decoder.get_output_embeddings()
    if not _transposable(head):
        return head
    return TransposedHead(aligned(head.weight.detach().t()))
