"""data=assistant: teacher-answered prompts (KD from cached top-k) + solver-written rows (CE), as the server renders."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from autoglm_train.data.assistant import AssistantDataSpec
from autoglm_train.data.assistant_datamodule import AssistantDataModule, MixedLoader
from autoglm_train.data.chat import IGNORE_INDEX, prompt_ids
from autoglm_train.data.loader import ResumableLoader
from autoglm_train.model.chat_template import bundle_chat_template
from autoglm_train.model.prompt_format import end_of_turn_id
from autoglm_train.model.thinking import THINK_CLOSE, THINK_OPEN
from tests.conftest import CACHE, REPO
from tests.micro_distill import MICRO_SHAPE

K = 4
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
SOLVED = [
    {"role": "user", "content": "What is 17 + 25?"},
    {"role": "assistant", "content": "The answer is 42.", "reasoning_content": "7+5=12, write 2 carry 1; 1+2+1=4."},
]


@dataclass
class Answer:
    """A teacher answer as the answer cache returns it (the fields a row reads)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def _answer(tok, prompt: list[int], text: str) -> Answer:
    ids = [*tok(text, add_special_tokens=False).input_ids, end_of_turn_id(tok)]
    n = len(ids)
    top = np.stack([np.arange(j, j + K) for j in range(n)]).astype(np.int32)  # row j: ids j..j+K-1
    lp = -np.tile(np.arange(1, K + 1, dtype=np.float32), (n, 1)) - np.arange(n, dtype=np.float32)[:, None]
    return Answer(prompt, ids, top, lp)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _module(tmp_path, tok, rows, **kw) -> AssistantDataModule:
    spec = AssistantDataSpec(prompts=str(_write(tmp_path / "p.jsonl", rows)), val_fraction=0.0, **kw)
    data = AssistantDataModule(spec, tok)
    data.attach_teacher_answers([_answer(tok, p, "Rome is the capital.") for p in data.teacher_prompts()])
    data.setup("fit")
    return data


def test_teacher_rows_label_the_answer_only_and_carry_its_topk_at_the_label_positions(tmp_path, student_tok):
    data = _module(tmp_path, student_tok, [{"messages": MULTI, "source": "teacher"}], seq_len=96)
    row = data.data.train[0]
    prompt = prompt_ids(student_tok, bundle_chat_template(student_tok), MULTI, False)
    p = len(prompt)
    assert row["input_ids"][:p].tolist() == prompt and int(row["prompt_len"]) == p
    answer = _answer(student_tok, prompt, "Rome is the capital.")
    labels, weight = row["labels"], row["kd_weight"]
    # the multi-turn history's earlier answer is a CE target (weight 0); system and user tokens never count
    history_targets = [t for t in range(p - 1) if labels[t] != IGNORE_INDEX]
    assert student_tok.decode(labels[history_targets]) == "Paris.<|im_end|>"
    assert not weight[: p - 1].any()
    for j, token in enumerate(answer.answer_ids):  # answer token j is the label at t = p - 1 + j
        t = p - 1 + j
        assert labels[t] == token and row["input_ids"][t + 1] == token and weight[t] == 1.0
        assert row["topk_ids"][t].tolist() == answer.topk_ids[j].tolist()
        assert row["topk_logprobs"][t].tolist() == answer.topk_logprobs[j].tolist()
    end = p - 1 + len(answer.answer_ids)
    assert (labels[end:] == IGNORE_INDEX).all() and not weight[end:].any() and not row["topk_ids"][end:].any()
    assert data.stats["teacher_rows"] == 1 and data.stats["teacher_tokens"] == len(answer.answer_ids)


def test_a_truncated_answer_keeps_topk_aligned_up_to_the_block_end(tmp_path, student_tok):
    prompt = prompt_ids(student_tok, bundle_chat_template(student_tok), MULTI[:2], False)
    seq_len = len(prompt) + 3
    data = _module(tmp_path, student_tok, [{"messages": MULTI[:2]}], seq_len=seq_len)
    row = data.data.train[0]
    p = len(prompt)
    assert row["kd_weight"].sum() == seq_len - p  # labels at p-1 .. seq_len-2
    assert row["topk_ids"][seq_len - 2].tolist() == list(range(seq_len - 1 - p, seq_len - 1 - p + K))
    assert data.stats["truncated"] == 1


def test_solver_rows_are_ce_only_and_thinking_off_holds_the_empty_think_block(tmp_path, student_tok):
    rows = [{"messages": SOLVED, "source": "solver", "family": "add", "answer": "42"}] * 6
    data = _module(tmp_path, student_tok, rows, seq_len=128, thinking_share=0.5)
    texts = []
    for i in range(len(data.data.train)):
        row = data.data.train[i]
        assert not row["kd_weight"].any() and not row["topk_ids"].any() and not row["topk_logprobs"].any()
        n = int(row["attention_mask"].sum())
        texts.append(student_tok.decode(row["input_ids"][:n]))
        labelled = student_tok.decode(row["labels"][row["labels"] != IGNORE_INDEX])
        assert labelled.endswith("The answer is 42.<|im_end|>") and "17 + 25" not in labelled
    off = [t for t in texts if "carry" not in t]
    on = [t for t in texts if "carry" in t]
    assert off and on and data.stats["thinking_on"] == len(on)  # the coin lands both ways over 6 rows
    assert all(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\nThe answer is 42." in t for t in off)
    assert all(f"{THINK_OPEN}\n7+5=12" in t for t in on)


def test_every_batch_has_the_same_columns(tmp_path, student_tok):
    rows = [{"messages": SOLVED}, {"messages": MULTI}] * 3
    data = _module(tmp_path, student_tok, rows, seq_len=96, batch_size=3)
    for batch in data.train_dataloader():
        assert sorted(batch) == sorted(
            ["input_ids", "attention_mask", "labels", "kd_weight", "topk_ids", "topk_logprobs", "prompt_len"]
        )
        assert batch["topk_ids"].shape == (3, 96, K) and batch["kd_weight"].dtype == torch.float32


def test_prompts_without_answers_are_refused(tmp_path, student_tok):
    spec = AssistantDataSpec(prompts=str(_write(tmp_path / "p.jsonl", [{"messages": MULTI}])), val_fraction=0.0)
    with pytest.raises(RuntimeError, match="attach_teacher_answers"):
        AssistantDataModule(spec, student_tok).setup("fit")


def _loader(n: int, seed: int, offset: int = 0) -> ResumableLoader:
    return ResumableLoader([{"x": np.int64(offset + i)} for i in range(n)], 2, seed=seed)


def _mixed() -> MixedLoader:
    return MixedLoader(_loader(10, 1), _loader(6, 2, offset=100), share=0.4, seed=7)


def test_mixed_batches_follow_a_seeded_coin_and_resume_mid_pass() -> None:
    straight = _mixed()
    assert len(straight) == math.ceil(5 / 0.6)
    want = [int(b["x"][0]) for _ in range(2) for b in straight]  # two passes
    kinds = [straight.is_text(e, i) for e in range(2) for i in range(len(straight))]
    assert [x >= 100 for x in want] == kinds and 0 < sum(kinds) < len(kinds)  # homogeneous batches, by the coin
    again = _mixed()
    assert want == [int(b["x"][0]) for _ in range(2) for b in again]  # a function of the seed alone

    broken = _mixed()
    it = iter(broken)
    got = [int(next(it)["x"][0]) for _ in range(4)]
    resumed = _mixed()
    resumed.load_state_dict(json.loads(json.dumps(broken.state_dict())))
    got += [int(b["x"][0]) for _ in range(2) for b in resumed]
    assert got == want


def _run_overrides(tmp_path: Path, prompts: Path) -> list[str]:
    shape = [o for o in MICRO_SHAPE if not o.startswith(("data=", "data.seq_len", "data.batch_size"))]
    return [
        "recipe=distill",
        "data=assistant",
        f"data.prompts={prompts}",
        "data.seq_len=64",
        "data.batch_size=2",
        *shape,
        "recipe.teacher_answers.max_new_tokens=8",
        "recipe.teacher_answers.batch_size=4",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "recipe.sample_max_new_tokens=2",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.cache_dir={CACHE / 'teachers'}",
        "run_name=t",
    ]


def test_tiny_assistant_distill_run_reports_teacher_answers_and_reuses_them(tmp_path):
    from recipes.distill import run

    chat = [{"messages": [{"role": "user", "content": f"Name a colour, number {i}."}]} for i in range(6)]
    prompts = _write(tmp_path / "prompts.jsonl", chat + [{"messages": SOLVED}] * 4)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=_run_overrides(tmp_path, prompts))
    summary = run(cfg)
    assert summary["global_step"] == 2
    answers = summary["teacher_answers"]
    assert answers["generated"] == 6 and answers["reused"] == 0 and answers["seconds"] > 0
    assert summary["data"]["teacher_rows"] + summary["data"]["written_rows"] == 10
    assert math.isfinite(summary["val/loss"]) and math.isfinite(summary["val/kl_to_teacher"])

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        again = compose(config_name="train", overrides=[*_run_overrides(tmp_path, prompts), "run_name=t2"])
    second = run(again)
    assert second["teacher_answers"]["generated"] == 0 and second["teacher_answers"]["reused"] == 6
