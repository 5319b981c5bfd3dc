"""On-policy λ on conversation batches: the student answers each teacher row's own prompt, the teacher grades."""

from __future__ import annotations

from functools import partial

import torch

from autoglm_train.distill.kd_loss import KDLoss
from autoglm_train.distill.on_policy import chat_on_policy_batch, sample_after_prompts, sampling_generator
from autoglm_train.tasks.distill_task import DistillTask, split_lm
from tests.test_on_policy import V, _student, _teacher

T, N = 16, 5


def _chat_batch() -> dict[str, torch.Tensor]:
    """Three right-padded rows: a teacher row (prompt 6), a solver row (prompt 4), a teacher row (prompt 9)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(2, V, (3, T), generator=g)
    prompt_len = torch.tensor([6, 4, 9])
    labels = torch.full((3, T), -100)
    weight = torch.zeros(3, T)
    for b, p in enumerate(prompt_len.tolist()):
        labels[b, p - 1 : T - 3] = ids[b, p : T - 2]
        weight[b, p - 1 : T - 3] = 0.0 if b == 1 else 1.0
    mask = torch.ones(3, T, dtype=torch.long)
    mask[:, T - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "kd_weight": weight, "prompt_len": prompt_len}


def test_one_on_policy_step_on_a_chat_batch_scores_only_the_generated_tokens() -> None:
    loss = KDLoss(kd_ratio=0.5, chunk_size=7, lmbda=1.0, gen_temperature=1.0, max_new_tokens=N)
    task = DistillTask(_student(), _teacher(), loss, partial(torch.optim.AdamW, lr=1e-3), None, V, seed=3)
    batch = _chat_batch()
    got, seconds = task.maybe_on_policy(batch)
    assert seconds is not None and got["input_ids"].shape == (2, T)  # the solver row takes no part

    prompts = [batch["input_ids"][0, :6], batch["input_ids"][2, :9]]
    new = sample_after_prompts(task.student, prompts, N, 1.0, sampling_generator(3, 0, 0, torch.device("cpu")), V)
    for row, (prompt, answer) in enumerate(zip(prompts, new, strict=True)):
        p = prompt.numel()
        assert torch.equal(got["input_ids"][row, :p], prompt)  # the row's own prompt, unpadded
        assert torch.equal(got["labels"][row, p - 1 : p - 1 + N], answer)  # the student's answer is the target
        assert (got["labels"][row, : p - 1] == -100).all() and (got["labels"][row, p - 1 + N :] == -100).all()
        assert got["attention_mask"][row].sum() == min(p + N, T)

    out, _, _ = task._loss(got, with_ce=False)
    assert out.num_tokens == 2 * N  # generated tokens only
    # the loss is the teacher's grading of those tokens alone: KD on the generated positions, no CE
    s_logits = split_lm(task.student)[1](task._hidden(task.student, got))[..., :V]
    t_logits = task.teacher(input_ids=got["input_ids"], attention_mask=got["attention_mask"]).logits[..., :V]
    mask = got["labels"] != -100
    p_t, log_q = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    want = (p_t.exp() * (p_t - log_q)).sum(-1)[mask].mean()
    torch.testing.assert_close(out.loss, 0.5 * want, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert task.student.model.embed_tokens.weight.grad is not None


def test_an_answer_ends_after_its_end_of_turn_and_at_the_block_end() -> None:
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    new = [torch.tensor([10, 1, 11, 12]), torch.tensor([13, 14, 15, 16])]
    out = chat_on_policy_batch(prompts, new, seq_len=5, stop_id=1)
    assert out["input_ids"][0].tolist() == [5, 6, 7, 10, 1] and out["labels"][0].tolist() == [-100, -100, 10, 1, -100]
    assert out["input_ids"][1].tolist() == [8, 9, 13, 14, 15] and out["labels"][1].tolist() == [-100, 13, 14, 15, 16]


def test_a_batch_without_teacher_rows_stays_off_policy() -> None:
    loss = KDLoss(kd_ratio=0.5, lmbda=1.0, max_new_tokens=N)
    task = DistillTask(_student(), _teacher(), loss, partial(torch.optim.AdamW, lr=1e-3), None, V, seed=3)
    batch = _chat_batch()
    batch["kd_weight"].zero_()
    got, seconds = task.maybe_on_policy(batch)
    assert got is batch and seconds is None


def test_validation_scores_the_live_teacher_on_teacher_written_tokens_only() -> None:
    from autoglm_train.distill.teacher_agreement import teacher_agreement_and_kl

    loss = KDLoss(kd_ratio=0.5, chunk_size=7)
    task = DistillTask(_student(), _teacher(), loss, partial(torch.optim.AdamW, lr=1e-3), None, V).eval()
    batch = _chat_batch()
    # cached top-k that would give a different KD: validation must ignore it in favour of the live teacher
    batch["topk_logprobs"] = torch.zeros(3, T, 4)
    batch["topk_ids"] = torch.zeros(3, T, 4, dtype=torch.long)
    with torch.no_grad():
        out, agree, kl, kd_tokens = task._val_metrics(batch)
        s_hidden = task._hidden(task.student, batch)
        t_hidden = task._hidden(task.teacher, batch)
        teacher_only = batch["labels"].masked_fill(batch["kd_weight"] == 0, -100)
        heads = split_lm(task.student)[1], split_lm(task.teacher)[1]
        want_agree, want_kl = teacher_agreement_and_kl(s_hidden, heads[0], t_hidden, heads[1], teacher_only, V, 7)
        all_kl = teacher_agreement_and_kl(s_hidden, heads[0], t_hidden, heads[1], batch["labels"], V, 7)[1]
    assert kd_tokens == int((teacher_only != -100).sum()) < out.num_tokens  # the solver row's tokens left out
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(agree, want_agree)
    assert abs(float(kl) - float(all_kl)) > 1e-4  # measuring over every target token would differ
    live = KDLoss(kd_ratio=0.5, chunk_size=7)(
        s_hidden, heads[0], batch["labels"], t_hidden, heads[1], vocab_size=V, kd_weight=batch["kd_weight"]
    )
    torch.testing.assert_close(out.loss, live.loss)  # the live teacher's loss, not the cached top-k's
