"""On-policy distillation (loss.lmbda): the student writes the batch, scored on generated tokens only, resumable."""

from __future__ import annotations

import csv
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autoglm_train.distill.divergences import KD_KINDS
from autoglm_train.distill.kd_loss import KDLoss
from autoglm_train.distill.on_policy import (
    is_on_policy,
    on_policy_batch,
    sample_continuations,
    sampling_generator,
)
from autoglm_train.model.decoder import build_decoder
from autoglm_train.tasks.distill_task import DistillTask, split_lm
from tests.conftest import micro_spec

V = 120  # real vocabulary; the student has padding rows beyond it that must never be sampled


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_decoder(micro_spec(), V, 0, 1).train()


def _teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _no_cache_sampling(model, prompts, n: int, temperature: float, generator) -> torch.Tensor:
    """The reference: a full forward over the whole sequence for every new token (no KV cache)."""
    seq = prompts
    with torch.no_grad():
        for _ in range(n):
            logits = model.eval()(input_ids=seq, use_cache=False).logits[:, -1, :V].float()
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
            seq = torch.cat([seq, token], dim=1)
    return seq[:, prompts.shape[1] :]


def test_kv_cache_sampling_draws_what_the_student_would_draw_step_by_step() -> None:
    student = _student()
    prompts = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    got = sample_continuations(student, prompts, 6, 0.8, torch.Generator().manual_seed(7), vocab_size=V)
    assert student.training  # put back in the mode it came in
    want = _no_cache_sampling(student, prompts, 6, 0.8, torch.Generator().manual_seed(7))
    assert got.shape == (3, 6) and torch.equal(got, want)
    assert int(got.max()) < V
    again = sample_continuations(student, prompts, 6, 0.8, torch.Generator().manual_seed(7), vocab_size=V)
    assert torch.equal(got, again)  # a function of the generator's seed alone
    greedy = sample_continuations(student, prompts, 6, 0.0, torch.Generator().manual_seed(0), vocab_size=V)
    assert torch.equal(greedy[:, 0], student(prompts).logits[:, -1, :V].argmax(-1))


def test_on_policy_batch_keeps_the_block_length_and_scores_only_generated_tokens() -> None:
    ids = torch.arange(20).view(2, 10)
    new = torch.full((2, 4), 99)
    batch = on_policy_batch(ids, new)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 10)
    assert batch["input_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 99, 99, 99]  # prompt = first 7 tokens
    assert batch["labels"][0].tolist() == [-100] * 6 + [99] * 4


def test_the_coin_is_shared_by_ranks_and_lands_at_lmbda() -> None:
    draws = [is_on_policy(0.3, 1234, i) for i in range(2000)]
    assert 0.26 < sum(draws) / len(draws) < 0.34
    assert draws == [is_on_policy(0.3, 1234, i) for i in range(2000)]
    assert not any(is_on_policy(0.0, 1, i) for i in range(50)) and all(is_on_policy(1.0, 1, i) for i in range(50))
    a = sampling_generator(1, 5, 0, torch.device("cpu"))
    b = sampling_generator(1, 5, 1, torch.device("cpu"))
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))  # each rank samples its own


def _task(kind: str = "forward_kl", lmbda: float = 1.0) -> DistillTask:
    loss = KDLoss(kind=kind, kd_ratio=0.5, chunk_size=7, lmbda=lmbda, gen_temperature=1.0, max_new_tokens=5)
    task = DistillTask(_student(), _teacher(), loss, partial(torch.optim.AdamW, lr=1e-3), None, V, seed=42)
    return task


@pytest.mark.parametrize("kind", KD_KINDS)
def test_on_policy_batches_are_generated_by_the_student_and_scored_on_generated_tokens(kind: str) -> None:
    task = _task(kind)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    batch, seconds = task.maybe_on_policy({"input_ids": ids, "labels": ids.roll(-1, 1)})
    assert seconds is not None and seconds >= 0 and task._micro_batches == 1
    prompts = ids[:, :8]  # 12 - 5 + 1
    want = sample_continuations(task.student, prompts, 5, 1.0, sampling_generator(42, 0, 0, ids.device), V)
    assert torch.equal(batch["input_ids"][:, :8], prompts) and torch.equal(batch["input_ids"][:, 8:], want[:, :4])
    assert torch.equal(batch["labels"][:, 7:], want) and (batch["labels"][:, :7] == -100).all()

    out, _, teacher_hidden = task._loss(batch, with_ce=False)
    assert out.num_tokens == 2 * 5
    # the teacher scored the student's sequence: its hidden states are those of the generated batch
    torch.testing.assert_close(teacher_hidden, task.teacher.model(input_ids=batch["input_ids"]).last_hidden_state)
    # only generated positions count, and no CE on the student's own samples: the KD term alone
    student_logits = split_lm(task.student)[1](task.student.model(input_ids=batch["input_ids"]).last_hidden_state)
    teacher_logits = task.teacher(input_ids=batch["input_ids"]).logits
    mask = batch["labels"] != -100
    ref = KDLoss(kind=kind, kd_ratio=1.0, chunk_size=1000)
    want_kd = ref(
        student_logits[:, :, :V].detach().requires_grad_(),
        torch.nn.Identity(),
        torch.where(mask, batch["labels"], -100),
        teacher_hidden=teacher_logits,
        teacher_head=torch.nn.Identity(),
    ).kd_loss
    torch.testing.assert_close(out.loss, 0.5 * want_kd, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert task.student.model.embed_tokens.weight.grad is not None


def test_off_policy_draws_leave_the_batch_alone() -> None:
    task = _task(lmbda=0.0)
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long)}
    assert task.maybe_on_policy(batch) == (batch, None)
    with pytest.raises(ValueError, match=r"loss\.lmbda=0\.5 needs a live teacher"):
        DistillTask(_student(), None, KDLoss(lmbda=0.5), partial(torch.optim.AdamW), None, V)
    with pytest.raises(ValueError, match=r"loss\.lmbda=1\.5"):
        KDLoss(lmbda=1.5)


def test_on_policy_run_resumes_exactly_after_sigkill(tmp_path) -> None:
    """λ = 0.5: a run killed at step 5 and resumed records the same losses as an uninterrupted one (1e-5)."""
    from tests.test_distill_recipe import _corpus, _losses, _overrides, _train_subprocess

    corpus, steps = _corpus(tmp_path), 7
    on_policy = ["loss.lmbda=0.5", "loss.max_new_tokens=8", "loss.gen_temperature=1.0"]
    rec = "+callbacks=[{_target_: tests.faults.LossRecorder, path: %s}]"
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    a = _train_subprocess(straight, _overrides(straight, corpus, steps) + on_policy, rec % (straight / "loss.jsonl"))
    assert a.returncode == 0, a.stderr[-3000:]
    killed = _train_subprocess(
        broken,
        _overrides(broken, corpus, steps) + on_policy,
        "+callbacks=[{_target_: tests.faults.LossRecorder, path: %s}, {_target_: tests.faults.KillAtStep, step: 5}]"
        % (broken / "loss.jsonl"),
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _train_subprocess(broken, _overrides(broken, corpus, steps) + on_policy, rec % (broken / "loss.jsonl"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _losses(straight / "loss.jsonl"), _losses(broken / "loss.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-5, (step, want[step], got[step])
    rows = list(csv.DictReader(next((straight / "outputs" / "t" / "logs").glob("version_*/metrics.csv")).open()))
    flags = {float(r["train/on_policy"]) for r in rows if r.get("train/on_policy")}
    assert flags == {0.0, 1.0}  # both kinds of batch happened in this run
    gen = [float(r["train/gen_seconds"]) for r in rows if r.get("train/gen_seconds")]
    assert max(gen) > 0.0
