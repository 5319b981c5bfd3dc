"""Validation against the teacher from hidden states, chunk by chunk: top-1 agreement and KL.

The metric itself is :func:`~autoglm_train.model.next_token_metrics.next_token_sums`, the one the int8
comparison and the export's parity check use; here it runs on chunks of positions so that at most
``chunk_size`` × V logits exist at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autoglm_train.distill.head_logits import Head, chunks, slice_vocab, upcast
from autoglm_train.model.next_token_metrics import next_token_sums


@torch.no_grad()
def teacher_agreement_and_kl(
    student_hidden: Tensor,
    student_head: Head,
    teacher_hidden: Tensor,
    teacher_head: Head,
    labels: Tensor,
    vocab_size: int | None = None,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Validation metrics at τ = 1: (fraction of positions where the argmaxes agree, mean KL(p‖q) in nats).

    Returns 0-dim tensors (no host sync) averaged over the non-ignored positions; both are
    0 when every position is ignored.
    """
    flat_labels = labels.reshape(-1)
    idx = (flat_labels != ignore_index).nonzero().squeeze(1)
    n = idx.numel()
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx)
    agree = torch.zeros((), device=student_hidden.device)
    kl = torch.zeros((), device=student_hidden.device)
    for s in chunks(n, chunk_size):
        s_logits = slice_vocab(upcast(student_head(hs[s])), vocab_size, "student")
        t_logits = slice_vocab(upcast(teacher_head(ht[s])), vocab_size, "teacher")
        sums = next_token_sums(s_logits, reference=t_logits)
        agree += sums["agree"]
        kl += sums["kl"]
    denom = max(n, 1)
    return agree / denom, kl / denom
