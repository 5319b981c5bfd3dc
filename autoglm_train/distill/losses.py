"""Knowledge-distillation losses computed from hidden states, chunk by chunk.

Why hidden states and not logits: a 150k-vocab teacher and student at B×T = 8k positions
would need ~10 GB of float32 logits each, plus as much again kept for backward. Here
only non-ignored positions are gathered, then ``chunk_size`` of them at a time go
through the lm_heads inside ``torch.utils.checkpoint``, so at most one chunk of logits
exists at any moment, in the forward pass and in the backward pass (which recomputes
the chunk's logits instead of storing them).

All divergences take log-probabilities ``[..., V]`` (teacher first, student second) and
return one value per position ``[...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from autoglm_train.distill.chunk_buffers import ChunkBuffers
from autoglm_train.distill.forward_kl_chunk import forward_kl_chunk
from autoglm_train.distill.on_policy import OnPolicySpec

Head = Callable[[Tensor], Tensor]
KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
TOPK_KINDS = ("forward_kl", "reverse_kl", "tvd")


# ---------------------------------------------------------------------------
# Divergences (per position, on log-probs)
# ---------------------------------------------------------------------------


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dim; terms with p == 0 are exactly 0 rather than ``0·inf = nan``."""
    diff = (logp - logq).masked_fill(torch.isneginf(logp), 0.0)
    return (logp.exp() * diff).sum(-1)


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


# ---------------------------------------------------------------------------
# The loss module
# ---------------------------------------------------------------------------


@dataclass
class KDLossOutput:
    """Scalars, each a mean over the non-ignored positions (``kd_loss`` already includes τ²)."""

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    num_tokens: int


def _upcast(x: Tensor) -> Tensor:
    """Half-precision logits to float32: log_softmax over 100k+ columns loses too much in bf16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _slice_vocab(logits: Tensor, vocab_size: int | None, who: str) -> Tensor:
    """Keep the real vocab columns: teachers pad their head, students may reserve extra rows."""
    if vocab_size is None:
        return logits
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"{who} head gives {logits.shape[-1]} logits, fewer than vocab_size={vocab_size}")
    return logits[..., :vocab_size]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class KDLoss(nn.Module):
    """``kd_ratio·τ²·mean(D(p_τ‖q_τ)) + (1 − kd_ratio)·CE(student, labels)``, chunked.

    The τ² factor (Hinton et al., 2015) undoes the 1/τ² shrink that temperature puts on
    the soft-target gradients, so ``kd_ratio`` keeps the same KD/CE balance at any τ. It
    is applied to every ``kind`` for that reason. CE always uses τ = 1 and the student's
    full vocabulary.

    Args:
        kind: divergence, one of ``KD_KINDS``.
        temperature: τ > 0, divides both teacher and student logits for the KD term.
        beta: β in (0, 1) of the generalized JSD (``kind="jsd"``); at 0 or 1 it is identically 0.
        skew_alpha: α in [0, 1) for ``skew_kl``/``skew_reverse_kl``; 0 gives the plain KL.
        kd_ratio: weight of the KD term in [0, 1]; the CE term gets 1 − kd_ratio.
        chunk_size: positions per chunk; bounds the logits memory to chunk_size × V.
        ignore_index: label value of positions that are skipped entirely.
        lmbda: on-policy fraction (GKD's λ): the probability that the task replaces a batch by the student's own
            continuations, scored by the teacher (:mod:`autoglm_train.distill.on_policy`); 0 = off-policy only.
        gen_temperature: sampling temperature of those continuations (0 = greedy).
        max_new_tokens: tokens the student writes per on-policy sequence.
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        kd_ratio: float = 0.5,
        chunk_size: int = 256,
        ignore_index: int = -100,
        lmbda: float = 0.0,
        gen_temperature: float = 1.0,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        self.on_policy = OnPolicySpec(lmbda, gen_temperature, max_new_tokens)
        if kind not in KD_KINDS:
            raise ValueError(f"loss.kind={kind!r} is not one of {list(KD_KINDS)}")
        if not temperature > 0:
            raise ValueError(f"loss.temperature={temperature} must be > 0")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"loss.beta={beta} must be in (0, 1); the JSD is identically 0 at 0 and 1")
        if not 0.0 <= skew_alpha < 1.0:
            raise ValueError(f"loss.skew_alpha={skew_alpha} must be in [0, 1)")
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"loss.kd_ratio={kd_ratio} must be in [0, 1]")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"loss.chunk_size={chunk_size!r} must be a positive int")
        self.kind = kind
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.skew_alpha = float(skew_alpha)
        self.kd_ratio = float(kd_ratio)
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.buffers = ChunkBuffers()  # the fused path's per-chunk logits, reused (see chunk_buffers.py)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, temperature={self.temperature}, kd_ratio={self.kd_ratio}, "
            f"chunk_size={self.chunk_size}, lmbda={self.on_policy.lmbda}"
        )

    def forward(
        self,
        student_hidden: Tensor,
        student_head: Head,
        labels: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_head: Head | None = None,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
        vocab_size: int | None = None,
        with_ce: bool = True,
    ) -> KDLossOutput:
        """Loss from hidden states.

        Args:
            student_hidden: [B, T, Hs] final student hidden states (after the final norm).
            student_head: the student's lm_head, [.., Hs] → [.., Vs].
            labels: [B, T], already aligned (``labels[b, t]`` is the target of position t).
            teacher_hidden: [B, T, Ht] teacher hidden states, with ``teacher_head``.
            teacher_head: the teacher's lm_head, [.., Ht] → [.., Vt]; runs under no_grad.
            teacher_topk: instead of the two above, (log-probs [B, T, k], ids [B, T, k]).
            vocab_size: number of real vocab columns compared by the KD term; None compares
                all of them (teacher and student widths must then be equal).
            with_ce: False on on-policy batches, whose "labels" are the student's own samples: the loss is then
                ``kd_ratio·τ²·mean(D)`` alone (``ce_loss`` is still reported).
        """
        mode = self._mode(student_hidden, labels, teacher_hidden, teacher_head, teacher_topk)
        flat_labels = labels.reshape(-1)
        # nonzero() syncs with the device once; it buys never touching ignored positions again.
        idx = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = idx.numel()
        hs = student_hidden.reshape(-1, student_hidden.shape[-1])
        if n == 0:
            # Keep the graph connected to the head so DDP sees every parameter used.
            zero = _upcast(student_head(hs[:0])).sum()
            return KDLossOutput(loss=zero, kd_loss=zero.detach(), ce_loss=zero.detach(), num_tokens=0)

        h = hs.index_select(0, idx)
        y = flat_labels.index_select(0, idx)
        t_hidden = t_logp = t_ids = None
        if mode == "full":
            t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx)
        elif mode == "topk":
            k = teacher_topk[0].shape[-1]
            t_logp = teacher_topk[0].reshape(-1, k).index_select(0, idx)
            t_ids = teacher_topk[1].reshape(-1, k).index_select(0, idx)

        teacher = (t_hidden, t_logp, t_ids)
        if _fusable(student_head):
            # The fast path: each chunk's gradient is computed in the forward pass, nothing is recomputed.
            loss, kd_sum, ce_sum = _FusedKD.apply(
                h, student_head.weight, student_head.bias, y, teacher, teacher_head, vocab_size, mode, self, with_ce
            )
            self.buffers.release_unless_cpu()
            kd_loss = kd_sum * (self.temperature**2 / n)
            ce_loss = ce_sum / n
            return KDLossOutput(loss=loss, kd_loss=kd_loss, ce_loss=ce_loss, num_tokens=n)

        def chunk_sums(
            h_c: Tensor, y_c: Tensor, th_c: Tensor | None, tl_c: Tensor | None, ti_c: Tensor | None
        ) -> tuple[Tensor, Tensor]:
            return self._chunk_sums(h_c, y_c, th_c, tl_c, ti_c, student_head, teacher_head, vocab_size, mode)

        kd_sum = ce_sum = None
        for s in _chunks(n, self.chunk_size):
            args = (h[s], y[s], *(None if t is None else t[s] for t in teacher))
            if torch.is_grad_enabled():
                kd_c, ce_c = checkpoint(chunk_sums, *args, use_reentrant=False)
            else:
                kd_c, ce_c = chunk_sums(*args)
            kd_sum = kd_c if kd_sum is None else kd_sum + kd_c
            ce_sum = ce_c if ce_sum is None else ce_sum + ce_c

        kd_loss = kd_sum * (self.temperature**2 / n)
        ce_loss = ce_sum / n
        loss = self.kd_ratio * kd_loss + (1.0 - self.kd_ratio) * ce_loss if with_ce else self.kd_ratio * kd_loss
        return KDLossOutput(loss=loss, kd_loss=kd_loss, ce_loss=ce_loss, num_tokens=n)

    def _teacher_logp(
        self,
        mode: str,
        t_hidden: Tensor | None,
        t_logp: Tensor | None,
        teacher_head: Head | None,
        vocab_size: int | None,
        width: int,
    ) -> Tensor:
        """The teacher's log-probs at τ for one chunk (full [c, V] or top-k renormalised [c, k]); no grad."""
        tau = self.temperature
        with torch.no_grad():
            if mode == "full":
                t_logits = _teacher_logits(t_hidden, teacher_head, vocab_size, width)
                return F.log_softmax(t_logits if tau == 1.0 else t_logits / tau, dim=-1)
            # log p/τ renormalised over k == softmax(logits/τ) restricted to the top-k ids.
            return F.log_softmax(_upcast(t_logp) / tau, dim=-1)

    def _fused_chunk(
        self,
        z: Tensor,
        y: Tensor,
        teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
        teacher_head: Head | None,
        vocab_size: int | None,
        mode: str,
        coef: tuple[float, float] | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(Σ KD, Σ CE, ∂(c_kd·ΣKD + c_ce·ΣCE)/∂z or None) for one chunk of student logits ``z`` [c, Vs].

        ``coef`` = (c_kd, c_ce), or None when no gradient is needed. CE's gradient is softmax(z) − onehot(y). Forward
        KL at τ = 1, the default, is :func:`forward_kl_chunk` (reductions over logits); at other τ it has the closed
        form (q_τ − p_τ)/τ. Every other divergence and the top-k teacher get their gradient from autograd on this
        chunk's elementwise ops alone.
        """
        t_hidden, t_logp, t_ids = teacher
        tau = self.temperature
        if mode == "full" and self.kind == "forward_kl" and tau == 1.0:  # the default: reductions over logits
            width = _slice_vocab(z, vocab_size, "student").shape[-1]
            with torch.no_grad():
                t_logits = _teacher_logits(t_hidden, teacher_head, vocab_size, width, self.buffers)
            return forward_kl_chunk(z, t_logits, y, coef, self.buffers)
        logq = F.log_softmax(z, dim=-1)
        ce = -logq.gather(1, y[:, None]).sum()
        q = logq.exp() if coef is not None else None
        kd = ce.new_zeros(())
        grad_kd = None
        if mode != "none":
            z_kd = _slice_vocab(z, vocab_size, "student")
            width = z_kd.shape[-1]
            teacher_logp = self._teacher_logp(mode, t_hidden, t_logp, teacher_head, vocab_size, width)
            if mode == "full" and self.kind == "forward_kl":  # τ ≠ 1 (τ = 1 returned above)
                s_logp = F.log_softmax(z_kd / tau, dim=-1)
                p = teacher_logp.exp()
                # Σ p·(log p − log q) over the chunk, formed in place in the teacher's buffer (no new [c, V]
                # temporary) and summed by torch's cascade sum. A BLAS dot over the c·V products accumulates
                # sequentially in fp32: 1e-2 off per 256 × 49,152 chunk, 3e-4 on the loss, measured. p = 0 where
                # log p = −inf, so that is clamped to a finite value first (0·finite = 0, not nan).
                kd = teacher_logp.clamp_(min=torch.finfo(teacher_logp.dtype).min).sub_(s_logp).mul_(p).sum()
                if coef is not None:
                    grad_kd = s_logp.exp().sub_(p).div_(tau)
            else:
                with torch.enable_grad():
                    leaf = z_kd.detach().requires_grad_(coef is not None)
                    s_logp = F.log_softmax(leaf / tau, dim=-1)
                    if mode == "full":
                        d = divergence(self.kind, teacher_logp, s_logp, beta=self.beta, skew_alpha=self.skew_alpha)
                    else:
                        d = topk_divergence(self.kind, teacher_logp, s_logp, t_ids)
                    kd = d.sum()
                    grad_kd = torch.autograd.grad(kd, leaf)[0] if coef is not None else None
                kd = kd.detach()
        if coef is None:
            return kd, ce, None
        c_kd, c_ce = coef
        grad_z = q.mul_(c_ce)
        grad_z[torch.arange(z.shape[0], device=z.device), y] -= c_ce
        if grad_kd is not None:
            grad_z[:, : grad_kd.shape[-1]].add_(grad_kd, alpha=c_kd)
        return kd, ce, grad_z

    def _mode(
        self,
        student_hidden: Tensor,
        labels: Tensor,
        teacher_hidden: Tensor | None,
        teacher_head: Head | None,
        teacher_topk: tuple[Tensor, Tensor] | None,
    ) -> str:
        """Check the inputs and say which teacher signal is used: "full", "topk" or "none"."""
        bt = tuple(student_hidden.shape[:2])
        if student_hidden.dim() != 3 or tuple(labels.shape) != bt:
            raise ValueError(
                f"student_hidden must be [B, T, H] and labels [B, T]; got {tuple(student_hidden.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if teacher_hidden is not None and teacher_topk is not None:
            raise ValueError("pass teacher_hidden+teacher_head or teacher_topk, not both")
        if teacher_hidden is not None:
            if teacher_head is None:
                raise ValueError("teacher_hidden was given without teacher_head")
            if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != bt:
                raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} does not match [B, T]={bt}")
            return "full"
        if teacher_topk is not None:
            logp, ids = teacher_topk
            if tuple(logp.shape[:2]) != bt or logp.shape != ids.shape:
                raise ValueError(
                    f"teacher_topk log-probs {tuple(logp.shape)} and ids {tuple(ids.shape)} must both be "
                    f"[B, T, k] with [B, T]={bt}"
                )
            if self.kind not in TOPK_KINDS:
                raise NotImplementedError(
                    f"loss.kind={self.kind!r} is not implemented for a top-k teacher; use one of {list(TOPK_KINDS)}"
                )
            return "topk"
        if self.kd_ratio > 0:
            raise ValueError(
                f"loss.kd_ratio={self.kd_ratio} > 0 needs a teacher: pass teacher_hidden+teacher_head or teacher_topk"
            )
        return "none"

    def _chunk_sums(
        self,
        h: Tensor,
        y: Tensor,
        t_hidden: Tensor | None,
        t_logp: Tensor | None,
        t_ids: Tensor | None,
        student_head: Head,
        teacher_head: Head | None,
        vocab_size: int | None,
        mode: str,
    ) -> tuple[Tensor, Tensor]:
        """(Σ KD divergence, Σ CE) over one chunk of positions; the only place logits exist."""
        logits = _upcast(student_head(h))
        ce = F.cross_entropy(logits, y, reduction="sum")
        if mode == "none":
            return ce.new_zeros(()), ce
        s_logp = F.log_softmax(_slice_vocab(logits, vocab_size, "student") / self.temperature, dim=-1)
        # Recomputed during backward too (cheap next to holding all teacher logits).
        teacher_logp = self._teacher_logp(mode, t_hidden, t_logp, teacher_head, vocab_size, s_logp.shape[-1])
        if mode == "full":
            kd = divergence(self.kind, teacher_logp, s_logp, beta=self.beta, skew_alpha=self.skew_alpha)
        else:
            kd = topk_divergence(self.kind, teacher_logp, s_logp, t_ids)
        return kd.sum(), ce


def _teacher_logits(
    t_hidden: Tensor, teacher_head: Head, vocab_size: int | None, width: int, buffers: ChunkBuffers | None = None
) -> Tensor:
    """The teacher's float32 logits on the shared vocabulary for one chunk; refuses a width the student lacks.

    With ``buffers`` and a plain linear head, only the shared rows of its weight are multiplied, into a reused buffer.
    """
    if buffers is not None and _fusable(teacher_head):
        weight = _slice_vocab(teacher_head.weight.t(), vocab_size, "teacher").t()  # the shared rows, same refusal
        bias = teacher_head.bias
        t_logits = buffers.logits("teacher_logits", t_hidden, weight, None if bias is None else bias[: len(weight)])
    else:
        t_logits = _slice_vocab(_upcast(teacher_head(t_hidden)), vocab_size, "teacher")
    if t_logits.shape[-1] != width:
        raise ValueError(
            f"teacher gives {t_logits.shape[-1]} logits and student {width}; pass "
            "vocab_size to compare only the shared real vocabulary"
        )
    return t_logits


def _fusable(head: Head) -> bool:
    """A plain ``nn.Linear`` with its whole weight on hand: the fused path reads the weight directly.

    Anything else (a fake-quant head under QAT, a ZeRO-3 partitioned weight that only the module's own hooks gather)
    goes through the module call with per-chunk recomputation instead.
    """
    return type(head) is nn.Linear and not hasattr(head.weight, "ds_id")


class _FusedKD(torch.autograd.Function):
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_grad = any(ctx.needs_input_grad[:3])
        n = h.shape[0]
        c_kd = loss.kd_ratio * loss.temperature**2 / n if mode != "none" else 0.0
        c_ce = (1.0 - loss.kd_ratio) / n if with_ce else 0.0
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[2] else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in _chunks(n, loss.chunk_size):
            h_c = h[s]
            z = loss.buffers.logits("student_logits", h_c, weight, bias)
            kd, ce, grad_z = loss._fused_chunk(
                z,
                y[s],
                tuple(None if t is None else t[s] for t in teacher),
                teacher_head,
                vocab_size,
                mode,
                (c_kd, c_ce) if need_grad else None,
            )
            kd_sum += kd
            ce_sum += ce
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
        return (*grads, None, None, None, None, None, None, None)


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
    for s in _chunks(n, chunk_size):
        s_logits = _slice_vocab(_upcast(student_head(hs[s])), vocab_size, "student")
        t_logits = _slice_vocab(_upcast(teacher_head(ht[s])), vocab_size, "teacher")
        agree += (s_logits.argmax(-1) == t_logits.argmax(-1)).sum()
        kl += forward_kl(F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)).sum()
    denom = max(n, 1)
    return agree / denom, kl / denom
