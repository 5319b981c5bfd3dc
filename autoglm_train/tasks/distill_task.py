"""Distillation as a LightningModule: frozen teacher → student decoder, chunked KD loss."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from autoglm_train.distill.kd_loss import KDLoss
from autoglm_train.distill.on_policy import (
    chat_on_policy_batch,
    chat_prompts,
    is_on_policy,
    on_policy_batch,
    sample_after_prompts,
    sample_continuations,
    sampling_generator,
)
from autoglm_train.distill.teacher_agreement import teacher_agreement_and_kl
from autoglm_train.model.next_token_metrics import perplexity
from autoglm_train.tasks.sharding import call_through_root, fully_shard_decoder
from autoglm_train.tasks.student_build import StudentFactory, build_student
from autoglm_train.tasks.throughput import distill_step_flops
from autoglm_train.utils.batches import trim_right_padding
from autoglm_train.utils.sharded_checkpoint import assert_student_only


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, lm_head) of a transformers causal LM."""
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


class DistillTask(L.LightningModule):
    """Trains ``student`` to match ``teacher`` on next-token distributions.

    The teacher is held outside the module tree (a plain attribute in a tuple), so it is
    never in ``state_dict``, never given to the optimizer and never sharded as a student
    parameter; the task moves it to the student's device itself. Under every strategy
    (``conf/trainer``) that means: DDP wraps only the task's modules; DeepSpeed's engine sees
    only ``self.parameters()`` (ZeRO-3 partitions the student alone); FSDP2 shards
    ``self.student`` in :meth:`configure_model`; each rank runs a full teacher on its device, unless
    ``shard_teacher`` gives the teacher a ZeRO-3 inference engine of its own (1/N of it per rank).

    Given a factory instead of a module, the task builds the student in :meth:`configure_model`, inside the
    strategy's contexts, so ZeRO-3 and FSDP2 never hold it whole on every rank
    (:mod:`autoglm_train.tasks.student_build`).

    Args:
        student: the GLM causal LM being trained, or a :data:`StudentFactory` that builds it.
        teacher: frozen causal LM with the same token ids (``None``: hard labels only, or a teacher whose top-k the
            training batches carry, e.g. a teacher server; validation then reports the student's own loss).
        loss: the chunked KD loss (``conf/loss``).
        optimizer: ``partial`` taking the parameters (``conf/optim``).
        scheduler: ``partial`` taking the optimizer and ``num_training_steps``, or None.
        kd_vocab_size: leading vocab columns shared by teacher and student.
        shard_teacher: under ZeRO-3, partition the teacher over the ranks too (``teacher.shard``); it stays outside
            the module tree, its engine is held like the teacher itself.
        seed: base seed of the on-policy coin flips and samples (``loss.lmbda`` > 0); with the micro-batch counter
            kept in the checkpoint it makes a resumed run sample what the uninterrupted one did.
        stop_token_id: the end-of-turn id: an on-policy answer to a conversation prompt ends after it.

    Batches may carry ``kd_weight`` [B, T] (1 = teacher-written token, 0 = solver-written: CE only, see
    :class:`~autoglm_train.distill.kd_loss.KDLoss`) and the teacher's cached top-k (``topk_logprobs``/``topk_ids``):
    training then never runs the teacher, while validation scores against the live teacher when one is loaded (exact
    full-vocabulary KL and top-1 agreement), over the teacher-written tokens only; ``val/ppl`` counts every target.
    A ``prompt_len`` column marks conversation rows, which on-policy batches answer after their own prompts.
    """

    def __init__(
        self,
        student: nn.Module | StudentFactory,
        teacher: nn.Module | None,
        loss: KDLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        kd_vocab_size: int,
        shard_teacher: bool = False,
        seed: int = 0,
        stop_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self.student: nn.Module | None = student if isinstance(student, nn.Module) else None
        self._student_factory = None if isinstance(student, nn.Module) else student
        self.student_build = "given" if self.student is not None else "pending"
        self._teacher = (teacher,)
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.kd_vocab_size = kd_vocab_size
        self.shard_teacher = shard_teacher
        self._teacher_engine: tuple[Any, ...] = ()  # a tuple, so the engine is not registered as a submodule
        self._val: dict[str, float] = {}
        self.seed = seed
        self.stop_token_id = stop_token_id
        self._micro_batches = 0  # training micro-batches seen: the on-policy random numbers are a function of it
        if loss.on_policy.lmbda > 0 and teacher is None:
            raise ValueError(f"loss.lmbda={loss.on_policy.lmbda} needs a live teacher to score the student's samples")

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def configure_model(self) -> None:
        """Build the student from its factory (once); FSDP2 (``trainer=fsdp``) shards it layer by layer."""
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        if self.student is None:
            assert self._student_factory is not None
            self.student, self.student_build = build_student(self._student_factory, self.trainer, mesh)
        elif mesh is not None:
            fully_shard_decoder(self.student, mesh)

    def on_fit_start(self) -> None:
        self._place_teacher()

    def on_validation_start(self) -> None:
        self._place_teacher()

    def _place_teacher(self) -> None:
        teacher = self.teacher
        if teacher is None or getattr(teacher, "is_loaded_in_8bit", False):
            return  # bitsandbytes int8 weights are placed at load time and refuse .to()
        if self.shard_teacher:
            if not self._teacher_engine:
                shard = getattr(self._trainer.strategy, "shard_frozen_module", None)
                if shard is None:
                    raise ValueError(f"teacher.shard=true needs trainer=deepspeed_zero3, not {self._trainer.strategy}")
                self._teacher_engine = (shard(teacher),)
            return
        # The rank's compute device from the strategy: a ZeRO-3 engine built on zero.Init never calls module.to(),
        # so the module's own `device` is not always where the batches go.
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        first = next(teacher.parameters())
        if first.device != device:
            teacher.to(device)

    # --- forward pieces ---------------------------------------------------------------
    def _hidden(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        backbone, _ = split_lm(model)
        return backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state

    def _teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.teacher is None or (self.training and self.loss.kd_ratio == 0):
            return None  # kd_ratio=0 trains on CE alone: no teacher forward (validation still scores against it)
        with torch.no_grad():
            return self._hidden(self.teacher, batch)

    def _loss(self, batch: dict[str, torch.Tensor], with_ce: bool = True):
        student_hidden = self._hidden(self.student, batch)
        # validation uses the live teacher when there is one: its exact distribution, not the cached top-k
        cached = None if not self.training and self.teacher is not None else cached_teacher_topk(batch)
        teacher_hidden = self._teacher_hidden(batch) if cached is None else None  # cached: the teacher never runs
        return (
            self.loss(
                student_hidden,
                split_lm(self.student)[1],
                batch["labels"],
                teacher_hidden=teacher_hidden,
                teacher_head=split_lm(self.teacher)[1] if teacher_hidden is not None else None,
                teacher_topk=cached,
                vocab_size=self.kd_vocab_size,
                with_ce=with_ce,
                with_kd=self.training or self.teacher is not None or cached is not None,  # a remote teacher: val CE
                kd_weight=batch.get("kd_weight"),
            ),
            student_hidden,
            teacher_hidden,
        )

    def step_flops(self, batch: dict[str, torch.Tensor]) -> int:
        """Model FLOPs of one training step on this device, for :class:`~autoglm_train.tasks.throughput.Throughput`."""
        teacher = None if cached_teacher_topk(batch) is not None or self.loss.kd_ratio == 0 else self.teacher
        batch_size, seq_len = batch["input_ids"].shape
        return distill_step_flops(self.student, teacher, batch_size, seq_len)

    # --- steps ------------------------------------------------------------------------
    def maybe_on_policy(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
        """(the batch to train on, generation seconds or None): with probability ``loss.lmbda`` the student's own
        continuations of the batch's prefixes, or its answers to a conversation batch's prompts
        (:mod:`autoglm_train.distill.on_policy`), else the batch itself."""
        spec = self.loss.on_policy
        counter = self._micro_batches
        self._micro_batches += 1
        if not is_on_policy(spec.lmbda, self.seed, counter):
            return batch, None
        ids = batch["input_ids"]
        chat = "prompt_len" in batch
        if cached_teacher_topk(batch) is not None and not chat:
            raise ValueError("loss.lmbda > 0 needs the live teacher: the top-k cache scores the data, not the samples")
        if spec.max_new_tokens > ids.shape[1]:
            raise ValueError(f"loss.max_new_tokens={spec.max_new_tokens} > the blocks' {ids.shape[1]} tokens")
        prompts = chat_prompts(batch) if chat else None
        if chat and not prompts:
            return batch, None  # no teacher-written row: nothing the teacher can grade
        _sync(ids.device)
        start = time.perf_counter()
        generator = sampling_generator(self.seed, counter, self.global_rank, ids.device)
        args = (spec.max_new_tokens, spec.temperature, generator, self.kd_vocab_size)
        if chat:
            new = sample_after_prompts(self.student, prompts, *args)
            out = chat_on_policy_batch(prompts, new, ids.shape[1], self.stop_token_id)
        else:
            new = sample_continuations(self.student, ids[:, : ids.shape[1] - spec.max_new_tokens + 1], *args)
            out = on_policy_batch(ids, new)
        _sync(ids.device)
        return out, time.perf_counter() - start

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch, gen_seconds = self.maybe_on_policy(batch)
        batch = trim_right_padding(batch)  # padded conversation rows: the decoder runs on the longest row only
        out, _, _ = call_through_root(self.student, self._loss, batch, gen_seconds is None)
        bs = batch["input_ids"].shape[0]
        if self.loss.on_policy.lmbda > 0:
            self.log("train/on_policy", float(gen_seconds is not None), batch_size=bs)
            self.log("train/gen_seconds", gen_seconds or 0.0, batch_size=bs)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/kd_loss", out.kd_loss, batch_size=bs)
        self.log("train/ce_loss", out.ce_loss, batch_size=bs)
        self.log("train/tokens", float(out.num_tokens), reduce_fx="sum", batch_size=bs)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val = {"nll": 0.0, "tokens": 0.0, "agree": 0.0, "kl": 0.0, "kd_tokens": 0.0}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch = trim_right_padding(batch)
        out, agree, kl, kd_tokens = call_through_root(self.student, self._val_metrics, batch)
        n = float(out.num_tokens)
        self._val["nll"] += float(out.ce_loss) * n
        self._val["tokens"] += n
        if agree is not None:
            self._val["agree"] += float(agree) * kd_tokens
            self._val["kl"] += float(kl) * kd_tokens
            self._val["kd_tokens"] += kd_tokens

    def _val_metrics(self, batch: dict[str, torch.Tensor]):
        """(loss, top-1 agreement, KL, the tokens those two are means over): the teacher metrics count the
        teacher-written target tokens only when the batch says which they are (``kd_weight`` > 0)."""
        out, student_hidden, teacher_hidden = self._loss(batch)
        if teacher_hidden is None:
            return out, None, None, 0.0
        labels = batch["labels"]
        if "kd_weight" in batch:
            labels = labels.masked_fill(batch["kd_weight"] <= 0, self.loss.ignore_index)
        agree, kl = teacher_agreement_and_kl(
            student_hidden,
            split_lm(self.student)[1],
            teacher_hidden,
            split_lm(self.teacher)[1],
            labels,
            self.kd_vocab_size,
            self.loss.chunk_size,
        )
        return out, agree, kl, float((labels != self.loss.ignore_index).sum())

    def on_validation_epoch_end(self) -> None:
        tokens = max(self._val["tokens"], 1.0)
        metrics = {"val/loss": self._val["nll"] / tokens, "val/ppl": perplexity(self._val["nll"], tokens)}
        if self.teacher is not None:
            kd_tokens = max(self._val["kd_tokens"], 1.0)
            metrics["val/teacher_top1_agreement"] = self._val["agree"] / kd_tokens
            metrics["val/kl_to_teacher"] = self._val["kl"] / kd_tokens
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold the student only (asserted on every save, whatever the strategy), plus the on-policy
        counter that the sampling random numbers are derived from."""
        assert_student_only(checkpoint.get("state_dict", {}).keys(), "student.")
        checkpoint["on_policy"] = {"micro_batches": self._micro_batches, "seed": self.seed}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume the on-policy counter, so the next micro-batch draws what the interrupted run's would have."""
        self._micro_batches = int(checkpoint.get("on_policy", {}).get("micro_batches", 0))

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.teacher is not None:  # the teacher is frozen and outside the module tree; never optimised
            assert not {id(p) for p in self.teacher.parameters()} & {id(p) for p in params}
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so generation time is the generation's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_teacher_topk(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The offline teacher's (log-probs, ids) from a training batch with ``topk_cache`` columns, else None."""
    if "topk_logprobs" not in batch:
        return None
    return batch["topk_logprobs"].float(), batch["topk_ids"].long()
