"""Knowledge-distillation losses computed from hidden states, chunk by chunk.

Why hidden states and not logits: a 150k-vocab teacher and student at B×T = 8k positions
would need ~10 GB of float32 logits each, plus as much again kept for backward. Here
only non-ignored positions are gathered, then ``chunk_size`` of them at a time go
through the lm_heads inside ``torch.utils.checkpoint``, so at most one chunk of logits
exists at any moment, in the forward pass and in the backward pass (which recomputes
the chunk's logits instead of storing them).

The divergences are :mod:`.divergences`; with a plain linear student head the gradient of each chunk is
computed in the forward pass (:mod:`.fused_kd`) instead of recomputed in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from autoglm_train.distill.chunk_buffers import ChunkBuffers
from autoglm_train.distill.divergences import KD_KINDS, TOPK_KINDS, divergence, topk_divergence
from autoglm_train.distill.fused_kd import FusedKD
from autoglm_train.distill.head_logits import Head, chunks, fusable, slice_vocab, teacher_logits, upcast
from autoglm_train.distill.on_policy import OnPolicySpec


@dataclass
class KDLossOutput:
    """Scalars, each a mean over the non-ignored positions (``kd_loss`` already includes τ²)."""

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    num_tokens: int


class KDLoss(nn.Module):
    """``kd_ratio·τ²·mean(D(p_τ‖q_τ)) + (1 − kd_ratio)·CE(student, labels)``, chunked; per-token KD weights
    (``kd_weight``) give tokens that no teacher wrote CE alone.

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
        with_kd: bool = True,
        kd_weight: Tensor | None = None,
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
            with_kd: False when no teacher signal is expected (validation of a run whose teacher is a server: its
                top-k was cached for the training blocks only); the KD term is then 0 and ``ce_loss`` is the metric.
            kd_weight: [B, T] per-token KD weight w (1 = a teacher-written token, 0 = a solver-written one, which
                has no teacher signal worth matching): ``loss_t = w·(kd_ratio·τ²·D_t + (1 − kd_ratio)·CE_t) +
                (1 − w)·CE_t``, averaged over the target positions; ``kd_loss`` is then τ²·Σ w·D / Σ w (the mean
                over teacher-written tokens) and ``ce_loss`` the mean CE over all. None = 1 everywhere.
        """
        mode = self._mode(student_hidden, labels, teacher_hidden, teacher_head, teacher_topk, with_kd)
        if kd_weight is not None and tuple(kd_weight.shape) != tuple(labels.shape):
            raise ValueError(f"kd_weight {tuple(kd_weight.shape)} must be [B, T] like labels {tuple(labels.shape)}")
        flat_labels = labels.reshape(-1)
        # nonzero() syncs with the device once; it buys never touching ignored positions again.
        idx = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = idx.numel()
        hs = student_hidden.reshape(-1, student_hidden.shape[-1])
        if n == 0:
            # Keep the graph connected to the head so DDP sees every parameter used.
            zero = upcast(student_head(hs[:0])).sum()
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
        w = None if kd_weight is None else kd_weight.reshape(-1).index_select(0, idx).float()
        # kd_loss is the mean over the teacher-written tokens (all of them without weights)
        kd_tokens = n if w is None else (float(w.sum()) or 1.0)
        if fusable(student_head):
            # The fast path: each chunk's gradient is computed in the forward pass, nothing is recomputed.
            loss, kd_sum, ce_sum = FusedKD.apply(
                h, student_head.weight, student_head.bias, y, teacher, teacher_head, vocab_size, mode, self, with_ce, w
            )
            self.buffers.release_unless_cpu()
            kd_loss = kd_sum * (self.temperature**2 / kd_tokens)
            ce_loss = ce_sum / n
            return KDLossOutput(loss=loss, kd_loss=kd_loss, ce_loss=ce_loss, num_tokens=n)

        kd_sum, ce_sum, solo_sum = self._recompute_sums(h, y, teacher, w, student_head, teacher_head, vocab_size, mode)

        kd_mean = kd_sum * (self.temperature**2 / n)  # Σ w·D over all target positions: what the loss weighs
        ce_loss = ce_sum / n
        loss = self.kd_ratio * kd_mean + (1.0 - self.kd_ratio) * ce_loss if with_ce else self.kd_ratio * kd_mean
        if w is not None and with_ce:
            loss = loss + self.kd_ratio * (solo_sum / n)  # the CE that solver-written tokens get instead of KD
        kd_loss = kd_mean if w is None else kd_sum * (self.temperature**2 / kd_tokens)
        return KDLossOutput(loss=loss, kd_loss=kd_loss, ce_loss=ce_loss, num_tokens=n)

    def _recompute_sums(
        self,
        h: Tensor,
        y: Tensor,
        teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
        w: Tensor | None,
        student_head: Head,
        teacher_head: Head | None,
        vocab_size: int | None,
        mode: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(Σ w·D, Σ CE, Σ (1 − w)·CE) chunk by chunk, each chunk's logits recomputed in backward (checkpoint)."""

        def chunk_sums(
            h_c: Tensor, y_c: Tensor, th_c: Tensor | None, tl_c: Tensor | None, ti_c: Tensor | None, w_c: Tensor | None
        ) -> tuple[Tensor, Tensor, Tensor]:
            return self._chunk_sums(h_c, y_c, th_c, tl_c, ti_c, student_head, teacher_head, vocab_size, mode, w_c)

        kd_sum = ce_sum = solo_sum = None
        for s in chunks(h.shape[0], self.chunk_size):
            args = (h[s], y[s], *(None if t is None else t[s] for t in teacher), None if w is None else w[s])
            if torch.is_grad_enabled():
                kd_c, ce_c, solo_c = checkpoint(chunk_sums, *args, use_reentrant=False)
            else:
                kd_c, ce_c, solo_c = chunk_sums(*args)
            kd_sum = kd_c if kd_sum is None else kd_sum + kd_c
            ce_sum = ce_c if ce_sum is None else ce_sum + ce_c
            solo_sum = solo_c if solo_sum is None else solo_sum + solo_c
        return kd_sum, ce_sum, solo_sum

    def teacher_logp(
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
                t_logits = teacher_logits(t_hidden, teacher_head, vocab_size, width)
                return F.log_softmax(t_logits if tau == 1.0 else t_logits / tau, dim=-1)
            # log p/τ renormalised over k == softmax(logits/τ) restricted to the top-k ids.
            return F.log_softmax(upcast(t_logp) / tau, dim=-1)

    def _mode(
        self,
        student_hidden: Tensor,
        labels: Tensor,
        teacher_hidden: Tensor | None,
        teacher_head: Head | None,
        teacher_topk: tuple[Tensor, Tensor] | None,
        with_kd: bool = True,
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
        if self.kd_ratio > 0 and with_kd:
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
        w: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(Σ w·KD divergence, Σ CE, Σ (1 − w)·CE) over one chunk of positions; the only place logits exist."""
        logits = upcast(student_head(h))
        if w is None:
            ce = F.cross_entropy(logits, y, reduction="sum")
            solo = ce.new_zeros(())
        else:
            ce_rows = F.cross_entropy(logits, y, reduction="none")
            ce, solo = ce_rows.sum(), (ce_rows * (1.0 - w)).sum()
        if mode == "none":
            return ce.new_zeros(()), ce, solo
        s_logp = F.log_softmax(slice_vocab(logits, vocab_size, "student") / self.temperature, dim=-1)
        # Recomputed during backward too (cheap next to holding all teacher logits).
        teacher_logp = self.teacher_logp(mode, t_hidden, t_logp, teacher_head, vocab_size, s_logp.shape[-1])
        if mode == "full":
            kd = divergence(self.kind, teacher_logp, s_logp, beta=self.beta, skew_alpha=self.skew_alpha)
        else:
            kd = topk_divergence(self.kind, teacher_logp, s_logp, t_ids)
        return (kd.sum() if w is None else (kd * w).sum()), ce, solo
