"""The fused path of the chunked KD loss: each chunk's gradient is computed during the forward pass.

Used by :class:`~autoglm_train.distill.kd_loss.KDLoss` when the student head is a plain ``nn.Linear``
(:func:`~autoglm_train.distill.head_logits.fusable`); nothing is recomputed in backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from autoglm_train.distill.divergences import divergence, topk_divergence
from autoglm_train.distill.forward_kl_chunk import Coef, forward_kl_chunk, subtract_at_targets
from autoglm_train.distill.head_logits import Head, chunks, slice_vocab, teacher_logits

if TYPE_CHECKING:
    from autoglm_train.distill.kd_loss import KDLoss


def fused_chunk(
    loss: KDLoss,
    z: Tensor,
    y: Tensor,
    teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
    teacher_head: Head | None,
    vocab_size: int | None,
    mode: str,
    coef: tuple[Coef, Coef] | None,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(Σ w·KD, Σ CE, Σ (1 − w)·CE or None, ∂(Σ c_kd·KD + c_ce·CE)/∂z or None) for one chunk of student logits
    ``z`` [c, Vs].

    ``coef`` = (c_kd, c_ce), scalars or per-row [c, 1] tensors, or None when no gradient is needed; ``weight`` the
    per-row KD weight [c] (None = 1, sums formed as without weights). CE's gradient is softmax(z) − onehot(y). Forward
    KL at τ = 1, the default, is :func:`~autoglm_train.distill.forward_kl_chunk.forward_kl_chunk` (reductions over
    logits); at other τ it has the closed form (q_τ − p_τ)/τ. Every other divergence and the top-k teacher get their
    gradient from autograd on this chunk's elementwise ops alone.
    """
    t_hidden = teacher[0]
    tau = loss.temperature
    if mode == "full" and loss.kind == "forward_kl" and tau == 1.0:  # the default: reductions over logits
        width = slice_vocab(z, vocab_size, "student").shape[-1]
        with torch.no_grad():
            t_logits = teacher_logits(t_hidden, teacher_head, vocab_size, width, loss.buffers)
        return forward_kl_chunk(z, t_logits, y, coef, loss.buffers, weight)
    logq = F.log_softmax(z, dim=-1)
    ce_rows = logq.gather(1, y[:, None]).squeeze(1)
    ce = -ce_rows.sum()
    solo = None if weight is None else -(ce_rows * (1.0 - weight)).sum()
    q = logq.exp() if coef is not None else None
    kd = ce.new_zeros(())
    grad_kd = None
    if mode != "none":
        kd, grad_kd = _kd_and_grad(loss, z, teacher, teacher_head, vocab_size, mode, coef is not None)
        kd = kd.sum() if weight is None else (kd * weight).sum()
    if coef is None:
        return kd, ce, solo, None
    c_kd, c_ce = coef
    grad_z = q.mul_(c_ce)
    subtract_at_targets(grad_z, y, c_ce)
    if grad_kd is not None:
        if isinstance(c_kd, Tensor):
            grad_z[:, : grad_kd.shape[-1]].add_(grad_kd.mul_(c_kd))
        else:
            grad_z[:, : grad_kd.shape[-1]].add_(grad_kd, alpha=c_kd)
    return kd, ce, solo, grad_z


def _kd_and_grad(
    loss: KDLoss,
    z: Tensor,
    teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
    teacher_head: Head | None,
    vocab_size: int | None,
    mode: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(per-row divergence [c], ∂ΣD/∂z_kd unweighted or None): the caller weights both per row."""
    t_hidden, t_logp, t_ids = teacher
    tau = loss.temperature
    z_kd = slice_vocab(z, vocab_size, "student")
    width = z_kd.shape[-1]
    teacher_logp = loss.teacher_logp(mode, t_hidden, t_logp, teacher_head, vocab_size, width)
    if mode == "full" and loss.kind == "forward_kl":  # τ ≠ 1 (τ = 1 is forward_kl_chunk)
        s_logp = F.log_softmax(z_kd / tau, dim=-1)
        p = teacher_logp.exp()
        # Σ p·(log p − log q) per row, formed in place in the teacher's buffer (no new [c, V] temporary) and summed
        # by torch's cascade sum. A BLAS dot over the c·V products accumulates sequentially in fp32: 1e-2 off per
        # 256 × 49,152 chunk, 3e-4 on the loss, measured. p = 0 where log p = −inf, so that is clamped to a finite
        # value first (0·finite = 0, not nan).
        kd = teacher_logp.clamp_(min=torch.finfo(teacher_logp.dtype).min).sub_(s_logp).mul_(p).sum(-1)
        return kd, (s_logp.exp().sub_(p).div_(tau) if need_grad else None)
    with torch.enable_grad():
        leaf = z_kd.detach().requires_grad_(need_grad)
        s_logp = F.log_softmax(leaf / tau, dim=-1)
        if mode == "full":
            d = divergence(loss.kind, teacher_logp, s_logp, beta=loss.beta, skew_alpha=loss.skew_alpha)
        else:
            d = topk_divergence(loss.kind, teacher_logp, s_logp, t_ids)
        grad = torch.autograd.grad(d.sum(), leaf)[0] if need_grad else None
    return d.detach(), grad


class FusedKD(torch.autograd.Function):
    """The chunked KD + CE loss with each chunk's gradient computed during the forward pass (as Liger's fused
    distillation losses do): per chunk, student logits → loss sums → ∂loss/∂logits → accumulated gradients of the
    hidden states and the head weight (and bias). Backward only scales them by the incoming gradient. Nothing is
    recomputed, the teacher head is never differentiated, and at most one chunk of logits exists at a time.
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        y: Tensor,
        teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
        teacher_head: Head | None,
        vocab_size: int | None,
        mode: str,
        loss: KDLoss,
        with_ce: bool,
        kd_weight: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_grad = any(ctx.needs_input_grad[:3])
        n = h.shape[0]
        c_kd = loss.kd_ratio * loss.temperature**2 / n if mode != "none" else 0.0
        c_ce = (1.0 - loss.kd_ratio) / n if with_ce else 0.0
        # A token of weight w has CE weight 1 − kd_ratio·w = (1 − kd_ratio) + kd_ratio·(1 − w): the second part is
        # c_solo·Σ(1 − w)·CE, exactly 0 where w = 1 (the unweighted loss, bit for bit).
        c_solo = loss.kd_ratio / n if with_ce and kd_weight is not None else 0.0
        solo_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[2] else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in chunks(n, loss.chunk_size):
            h_c = h[s]
            z = loss.buffers.logits("student_logits", h_c, weight, bias)
            w_c = None if kd_weight is None else kd_weight[s]
            coef = (c_kd, c_ce) if w_c is None else (c_kd * w_c[:, None], c_ce + c_solo * (1.0 - w_c[:, None]))
            kd, ce, solo, grad_z = fused_chunk(
                loss,
                z,
                y[s],
                tuple(None if t is None else t[s] for t in teacher),
                teacher_head,
                vocab_size,
                mode,
                coef if need_grad else None,
                w_c,
            )
            kd_sum += kd
            ce_sum += ce
            if solo is not None:
                solo_sum += solo
            if grad_z is not None:
                gz = grad_z.to(weight.dtype)
                if grad_h is not None:
                    grad_h[s] = gz @ weight
                if grad_w is not None and gz.dtype == grad_w.dtype:
                    grad_w.addmm_(gz.t(), h_c.to(gz.dtype))
                elif grad_w is not None:  # half-precision head: accumulate its gradient in float32
                    grad_w += (gz.t() @ h_c.to(gz.dtype)).float()
                if grad_b is not None:
                    grad_b += grad_z.sum(0)
        value = c_kd * kd_sum + c_ce * ce_sum
        if c_solo:
            value = value + c_solo * solo_sum
        ctx.grads = (
            None if grad_h is None else grad_h.to(h.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return value, kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _kd: Tensor, _ce: Tensor) -> tuple[Tensor | None, ...]:
        grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)  # ours to scale
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None)
