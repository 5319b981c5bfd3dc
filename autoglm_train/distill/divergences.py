"""KD divergences on log-probabilities, one value per position.

Each takes log-probabilities ``[..., V]`` (teacher first, student second) and returns ``[...]``;
:func:`divergence` dispatches on ``loss.kind``, :func:`topk_divergence` handles a teacher known only
through its top-k. The plain KL is :func:`~autoglm_train.model.next_token_metrics.kl_per_position`,
the same one validation and the int8/export comparisons report.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from autoglm_train.model.next_token_metrics import kl_per_position as _kl

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
TOPK_KINDS = ("forward_kl", "reverse_kl", "tvd")


def _log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w·p + (1−w)·q), kept in log space so tiny probabilities do not underflow."""
    if w <= 0.0:
        return logq
    if w >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def forward_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(p‖q): mode-covering; the student is pushed to put mass wherever the teacher does."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(q‖p): mode-seeking; a small student may concentrate on the teacher's main modes."""
    return _kl(student_logp, teacher_logp)


def generalized_jsd(teacher_logp: Tensor, student_logp: Tensor, beta: float = 0.5) -> Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q (GKD); bounded, unlike either KL."""
    log_m = _log_mix(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def skew_kl(teacher_logp: Tensor, student_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(p ‖ α·p + (1−α)·q) (DistiLLM): mixing in p keeps the gradient finite where q ≈ 0."""
    return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))


def skew_reverse_kl(teacher_logp: Tensor, student_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(q ‖ α·q + (1−α)·p) (DistiLLM): reverse KL made stable where the teacher's p ≈ 0."""
    return _kl(student_logp, _log_mix(student_logp, teacher_logp, alpha))


def tvd(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Total variation 0.5·Σ|p − q|: bounded in [0, 1], insensitive to the tails."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def divergence(
    kind: str, teacher_logp: Tensor, student_logp: Tensor, *, beta: float = 0.5, skew_alpha: float = 0.1
) -> Tensor:
    """Dispatch on ``kind`` (one of ``KD_KINDS``); returns one value per position."""
    if kind == "forward_kl":
        return forward_kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return reverse_kl(teacher_logp, student_logp)
    if kind == "jsd":
        return generalized_jsd(teacher_logp, student_logp, beta)
    if kind == "skew_kl":
        return skew_kl(teacher_logp, student_logp, skew_alpha)
    if kind == "skew_reverse_kl":
        return skew_reverse_kl(teacher_logp, student_logp, skew_alpha)
    if kind == "tvd":
        return tvd(teacher_logp, student_logp)
    raise ValueError(f"loss.kind={kind!r} is not one of {list(KD_KINDS)}")


def topk_divergence(kind: str, teacher_logp_k: Tensor, student_logp: Tensor, topk_ids: Tensor) -> Tensor:
    """Divergence against a teacher known only through its top-k ``[..., k]``.

    The teacher distribution is its top-k renormalised to sum to 1 (``teacher_logp_k``
    must already be normalised over k), i.e. zero outside the k ids. Against that:

    * ``forward_kl``: Σ_k p_k (log p_k − log q_k) with q the student's full softmax, which
      is exactly KL(p̃‖q) since p̃ is zero elsewhere.
    * ``reverse_kl``: KL(q̃‖p̃) with the student also renormalised over the same k ids
      (against a zero-outside-k teacher, the un-renormalised KL would be infinite).
    * ``tvd``: exact TVD between p̃ and the full q: 0.5·(Σ_k|p_k − q_k| + (1 − Σ_k q_k)).

    With k = V all three equal their full-vocabulary versions.
    """
    if kind not in TOPK_KINDS:
        raise NotImplementedError(
            f"loss.kind={kind!r} is not implemented for a top-k teacher; use one of {list(TOPK_KINDS)} "
            "or pass full teacher hidden states"
        )
    student_logp_k = student_logp.gather(-1, topk_ids)
    if kind == "forward_kl":
        return _kl(teacher_logp_k, student_logp_k)
    if kind == "reverse_kl":
        return _kl(student_logp_k.log_softmax(-1), teacher_logp_k)
    q_k = student_logp_k.exp()
    outside = (1.0 - q_k.sum(-1)).clamp_min(0.0)
    return 0.5 * ((teacher_logp_k.exp() - q_k).abs().sum(-1) + outside)
