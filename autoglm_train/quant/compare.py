"""Score models against a reference on the same held-out text: perplexity, KL to it, top-1 agreement.

Used for int8 students (reference = the fp32 student) and int8 teachers (reference = the fp32
teacher). One sequence at a time, so at most a [T, V] block of logits per model exists. The metric is
:func:`~autoglm_train.model.next_token_metrics.next_token_sums`, the one validation and export parity use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from autoglm_train.model.next_token_metrics import next_token_sums, perplexity


@dataclass
class Score:
    """One model against the reference, averaged over the scored tokens."""

    ppl: float
    """exp(mean next-token cross-entropy on the labels), over the model's own vocabulary."""
    kl_to_ref: float
    """mean KL(p_ref ‖ p_model) in nats/token, over the shared vocabulary."""
    top1_agreement: float
    """fraction of tokens where the model's argmax equals the reference's."""
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits[0].float()


@torch.no_grad()
def compare_to_reference(
    reference: nn.Module,
    models: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, Tensor]],
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> dict[str, Score]:
    """Score ``reference`` (KL 0, agreement 1) and each of ``models`` on ``batches``.

    Args:
        reference: the model the others are compared with (fp32 student or fp32 teacher).
        models: name → model; all must share the reference's token ids.
        batches: ``{"input_ids": [B, T], "labels": [B, T]}`` with ``labels[:, t]`` the target of position t.
        vocab_size: leading vocab columns compared by KL/agreement (a padded head's extra rows are dropped).
    """
    names = ["reference", *models]
    sums = {n: {"nll": 0.0, "kl": 0.0, "agree": 0} for n in names}
    tokens = 0
    for batch in batches:
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            keep = labels != ignore_index
            if not keep.any():
                continue
            ids, y = ids.unsqueeze(0), labels[keep]
            ref = _logits(reference, ids)[keep]
            tokens += int(keep.sum())
            for name in names:
                logits = ref if name == "reference" else _logits(models[name], ids)[keep]
                seq = next_token_sums(logits, y, ref, vocab_size)  # the reference against itself: KL 0, all agree
                sums[name]["nll"] += float(seq["nll"])
                sums[name]["kl"] += float(seq["kl"])
                sums[name]["agree"] += int(seq["agree"])
    if tokens == 0:
        raise ValueError("compare_to_reference: no scored tokens in the batches")
    return {
        n: Score(
            ppl=perplexity(s["nll"], tokens),
            kl_to_ref=s["kl"] / tokens,
            top1_agreement=s["agree"] / tokens,
            tokens=tokens,
        )
        for n, s in sums.items()
    }
