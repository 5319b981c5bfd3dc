"""Next-token metrics, defined once: perplexity, KL to a reference model, top-1 agreement with it.

Validation (``distill.teacher_agreement``: the student against the teacher), the int8 comparison
(``quant.compare``: a model against its float reference) and the export's parity check
(``export.parity``: a form against the training model) all sum :func:`next_token_sums` over blocks of
positions and turn the totals into means (:func:`perplexity` for the NLL), so ``ppl``, ``kl`` and
``top1_agreement`` mean the same thing at every stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PPL_CAP = 50.0
"""Mean NLL is capped at this before ``exp``: an untrained model gets a large finite perplexity, not inf."""


def kl_per_position(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim of log-probs; terms with p == 0 are exactly 0 rather than ``0·inf = nan``."""
    diff = (logp - logq).masked_fill(torch.isneginf(logp), 0.0)
    return (logp.exp() * diff).sum(-1)


def next_token_sums(
    logits: Tensor,
    labels: Tensor | None = None,
    reference: Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, Tensor]:
    """Sums over the positions of ``logits`` [N, V], as 0-dim tensors (no host sync).

    Sums, not means, so that chunks and sequences add up; divide by N at the end.

    Args:
        logits: the scored model's logits, one row per position (float32 or upcast by the caller).
        labels: [N] target ids; gives ``"nll"`` = Σ −log p(label) over the model's whole vocabulary.
        reference: [N, V'] the reference model's logits at the same positions; gives ``"kl"`` = Σ KL(p_ref ‖ p)
            in nats and ``"agree"`` = Σ [argmax p == argmax p_ref], both over the first ``vocab_size`` columns.
        vocab_size: leading columns compared with the reference (a padded head's extra rows are dropped);
            None compares all of them.
    """
    sums: dict[str, Tensor] = {}
    if labels is not None:
        sums["nll"] = F.cross_entropy(logits, labels, reduction="sum")
    if reference is not None:
        mine = logits[..., :vocab_size] if vocab_size else logits
        ref = reference[..., :vocab_size] if vocab_size else reference
        sums["kl"] = kl_per_position(F.log_softmax(ref, -1), F.log_softmax(mine, -1)).sum()
        sums["agree"] = (mine.argmax(-1) == ref.argmax(-1)).sum()
    return sums


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp(mean NLL), the mean capped at :data:`PPL_CAP`; 1.0 for no tokens."""
    return math.exp(min(nll_sum / max(tokens, 1), PPL_CAP))
