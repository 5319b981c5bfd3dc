"""Per-token KD weights (``kd_weight``): teacher-written tokens get KD + CE, solver-written tokens CE alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_train.distill.divergences import TOPK_KINDS
from autoglm_train.distill.kd_loss import KDLoss
from tests.test_kd_losses import TOL, V_STUDENT, V, chunked, grads, make_case


class _Wrapped(nn.Module):
    """Not a plain nn.Linear: the loss takes its recompute (checkpointed) path instead of the fused one."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    @property
    def weight(self) -> Tensor:
        return self.head.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


def _weights(case: dict, seed: int = 5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, case["labels"].shape, generator=g).float()


def _hand_loss(case: dict, w: Tensor, tau: float, kd_ratio: float, topk: tuple[Tensor, Tensor] | None = None):
    """loss_t = w·(r·τ²·KL_t + (1−r)·CE_t) + (1−w)·CE_t over full-vocab logits, averaged over target positions."""
    s_logits = case["student_head"](case["student_hidden"])
    mask = case["labels"] != -100
    ce = F.cross_entropy(s_logits.reshape(-1, V_STUDENT), case["labels"].reshape(-1).clamp(min=0), reduction="none")
    ce = ce.view(mask.shape)
    if topk is None:
        p = torch.softmax(case["teacher_head"](case["teacher_hidden"]).detach()[..., :V] / tau, -1)
        q = torch.softmax(s_logits[..., :V] / tau, -1)
    else:
        p = torch.softmax(topk[0] / tau, -1)
        q = torch.softmax(s_logits[..., :V] / tau, -1).gather(-1, topk[1])  # the teacher renormalised over k
    kl = (p * (p / q).log()).sum(-1)
    per_token = w * (kd_ratio * tau**2 * kl + (1 - kd_ratio) * ce) + (1 - w) * ce
    kd_mean = (w * kl)[mask].sum() * tau**2 / w[mask].sum()
    return per_token[mask].mean(), kd_mean, ce[mask].mean()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_weighted_loss_equals_the_hand_computation(fused: bool, tau: float) -> None:
    case = make_case()
    if not fused:
        case["student_head"] = _Wrapped(case["student_head"])
    w = _weights(case)
    out = chunked(KDLoss(temperature=tau, kd_ratio=0.6, chunk_size=3), case, kd_weight=w)
    want, kd_mean, ce_mean = _hand_loss(case, w, tau, 0.6)
    torch.testing.assert_close(out.loss, want, **TOL)
    torch.testing.assert_close(out.kd_loss, kd_mean, **TOL)  # the mean over teacher-written tokens
    torch.testing.assert_close(out.ce_loss, ce_mean, **TOL)  # the mean over every target token
    for g, r in zip(grads(out.loss, case), grads(want, case), strict=True):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_weighted_loss_on_the_cached_topk_path(fused: bool, kind: str) -> None:
    case = make_case()
    if not fused:
        case["student_head"] = _Wrapped(case["student_head"])
    t_logp = case["teacher_head"](case["teacher_hidden"])[..., :V].log_softmax(-1)
    topk = t_logp.topk(6, -1)
    w = _weights(case, seed=9)
    kw = {"teacher_hidden": None, "teacher_head": None, "teacher_topk": topk}
    out = chunked(KDLoss(kind=kind, kd_ratio=0.5, chunk_size=4), case, kd_weight=w, **kw)
    if kind == "forward_kl":
        want, kd_mean, _ = _hand_loss(case, w, 1.0, 0.5, topk=topk)
        torch.testing.assert_close(out.loss, want, **TOL)
        torch.testing.assert_close(out.kd_loss, kd_mean, **TOL)
    # every kind: the teacher rows' KD as the unweighted loss computes it, CE for the rest
    full = chunked(KDLoss(kind=kind, kd_ratio=0.5, chunk_size=4), case, **kw)
    ce = chunked(KDLoss(kd_ratio=0.0, chunk_size=4), case, teacher_hidden=None, teacher_head=None)
    ones = chunked(KDLoss(kind=kind, kd_ratio=0.5, chunk_size=4), case, kd_weight=torch.ones_like(w), **kw)
    assert ones.loss.item() == full.loss.item()
    torch.testing.assert_close(out.ce_loss, ce.ce_loss, **TOL)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_weight_one_everywhere_is_todays_loss_and_zero_is_pure_ce(fused: bool, tau: float) -> None:
    case = make_case()
    if not fused:
        case["student_head"] = _Wrapped(case["student_head"])
    loss_fn = KDLoss(temperature=tau, kd_ratio=0.3, chunk_size=4)
    plain = chunked(loss_fn, case)
    ones = chunked(loss_fn, case, kd_weight=torch.ones(case["labels"].shape))
    assert ones.loss.item() == plain.loss.item()  # bit for bit
    assert ones.kd_loss.item() == plain.kd_loss.item() and ones.ce_loss.item() == plain.ce_loss.item()
    for g, r in zip(grads(ones.loss, case), grads(plain.loss, case), strict=True):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-6)

    zeros = chunked(loss_fn, case, kd_weight=torch.zeros(case["labels"].shape))
    logits = case["student_head"](case["student_hidden"]).reshape(-1, V_STUDENT)
    ce = F.cross_entropy(logits, case["labels"].reshape(-1))
    torch.testing.assert_close(zeros.loss, ce, **TOL)
    assert zeros.kd_loss.item() == 0.0
    for g, r in zip(grads(zeros.loss, case), grads(ce, case), strict=True):
        torch.testing.assert_close(g, r, **TOL)


def test_a_misshaped_weight_is_refused() -> None:
    case = make_case()
    with pytest.raises(ValueError, match="kd_weight"):
        chunked(KDLoss(), case, kd_weight=torch.ones(3))
