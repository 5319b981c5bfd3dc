"""data=chat: conversations rendered as the server renders them, loss on assistant tokens only."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from autoglm_train.data.chat import IGNORE_INDEX, ChatDataSpec, encode_conversation, thinks, to_row
from autoglm_train.data.chat_datamodule import build_chat
from autoglm_train.data.reader import DataError
from autoglm_train.model.chat_template import bundle_chat_template
from autoglm_train.model.prompt_format import render_chat
from autoglm_train.model.thinking import THINK_CLOSE, THINK_OPEN
from tests.conftest import CACHE, REPO
from tests.micro_distill import MICRO_SHAPE

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome.", "reasoning": "Italy's capital is Rome."},
]


def _labelled_text(tok, row) -> str:
    """The labelled tokens, decoded per maximal run and joined with '|'."""
    runs, run = [], []
    for label in [*row["labels"], IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(int(label))
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return "|".join(runs)


def _server_ids(tok, messages, enable_thinking: bool) -> list[int]:
    """What serve/chat.py does: the bundle tokenizer's template (as the export writes it) through the engine's
    render_chat, then engine.encode(text, add_special_tokens=False)."""
    served = copy.deepcopy(tok)
    served.chat_template = bundle_chat_template(tok)
    text = render_chat(served, None, messages, {"enable_thinking": enable_thinking})
    return served(text, add_special_tokens=False)["input_ids"]


def test_only_assistant_contents_and_end_of_turn_are_targets(student_tok):
    template = bundle_chat_template(student_tok)
    for thinking, answer in (
        (False, "Rome.<|im_end|>"),
        (True, f"{THINK_OPEN}\nItaly's capital is Rome.\n{THINK_CLOSE}\n\nRome.<|im_end|>"),
    ):
        ids, target, _ = encode_conversation(student_tok, template, CHAT, thinking)
        row = to_row(ids, target, 256, student_tok.pad_token_id)
        assert _labelled_text(student_tok, row) == f"Paris.<|im_end|>|{answer}"
        text = student_tok.decode(ids, skip_special_tokens=False)
        assert "You are terse." in text and "Capital of France?" in text  # rendered, never labelled
        assert int(row["attention_mask"].sum()) == len(ids)


@pytest.mark.parametrize("thinking", [False, True])
def test_training_prompt_is_the_servers_prompt(student_tok, thinking):
    ids, _, prompt_len = encode_conversation(student_tok, bundle_chat_template(student_tok), CHAT, thinking)
    assert ids[:prompt_len] == _server_ids(student_tok, CHAT[:4], thinking)
    first_turn, _, first_len = encode_conversation(student_tok, bundle_chat_template(student_tok), CHAT[:3], thinking)
    # a turn without reasoning is trained as the server renders it thinking-off, whatever the coin says
    assert first_turn[:first_len] == _server_ids(student_tok, CHAT[:2], False)


def test_thinking_off_has_the_empty_think_block_and_on_has_the_reasoning(student_tok):
    template = bundle_chat_template(student_tok)
    off, _, _ = encode_conversation(student_tok, template, CHAT, thinking=False)
    on, _, _ = encode_conversation(student_tok, template, CHAT, thinking=True)
    off_text, on_text = (student_tok.decode(x, skip_special_tokens=False) for x in (off, on))
    assert off_text.endswith(f"<|im_start|>assistant\n{THINK_OPEN}\n\n{THINK_CLOSE}\n\nRome.<|im_end|>")
    assert "Italy's capital" not in off_text
    assert on_text.endswith(
        f"<|im_start|>assistant\n{THINK_OPEN}\nItaly's capital is Rome.\n{THINK_CLOSE}\n\nRome.<|im_end|>"
    )
    # no reasoning: thinking on still renders the empty think block and the answer alone
    plain, _, _ = encode_conversation(student_tok, template, CHAT[:3], thinking=True)
    assert student_tok.decode(plain, skip_special_tokens=False).endswith(
        f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\nParis.<|im_end|>"
    )


def test_thinking_share_is_a_deterministic_per_row_coin():
    draws = [thinks(7, row, 0.3) for row in range(2000)]
    assert draws == [thinks(7, row, 0.3) for row in range(2000)]
    assert abs(sum(draws) / 2000 - 0.3) < 0.04
    assert not any(thinks(7, r, 0.0) for r in range(100)) and all(thinks(7, r, 1.0) for r in range(100))


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BAD_ROWS = [
    {"messages": "hello"},
    {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
    {"messages": [{"role": "user", "content": "q"}]},
    {"messages": []},
]


def test_bad_rows_are_reported_with_file_row_and_field_and_skipped(tmp_path, student_tok):
    good = {"messages": CHAT}
    path = _write(tmp_path / "chat.jsonl", [good, *BAD_ROWS, good])
    data = build_chat(ChatDataSpec(path=str(path), seq_len=32, val_fraction=0.0), student_tok)
    report = data.report
    assert report.documents == 2 and report.total_skipped == 5
    assert report.skipped == {"wrong_type": 2, "unknown_role": 1, "no_assistant": 1, "empty_text": 1}
    assert f"{path}:2: wrong_type: 'messages' must be a list of messages, got str" in report.examples
    assert f"{path}:3: unknown_role: messages[0].role: unknown role 'bot'" in " ".join(report.examples)
    assert f"{path}:4: wrong_type: messages[1].content must be a string, got NoneType" in report.examples
    # 32 tokens cut both conversations after the first answer: kept, truncated at the block end
    assert len(data.train) == 2 and data.stats["truncated"] == 2 and data.stats["no_target"] == 0
    assert "Paris.<|im_end|>" in _labelled_text(student_tok, data.train[0])
    tiny = build_chat(ChatDataSpec(path=str(path), seq_len=8, val_fraction=0.0), student_tok)
    assert len(tiny.train) == 0 and tiny.stats["no_target"] == 2  # no assistant token inside 8: skipped
    with pytest.raises(DataError, match=r"chat\.jsonl:2: wrong_type: 'messages'"):
        build_chat(ChatDataSpec(path=str(path), seq_len=32, strict=True), student_tok)


def test_tiny_distill_run_on_chat_trains_with_finite_loss(tmp_path):
    from recipes.distill import run

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {a}?"},
                {"role": "assistant", "content": str(2 * a), "reasoning_content": f"{a} + {a} = {2 * a}"},
            ]
        }
        for a in range(12)
    ]
    path = _write(tmp_path / "chat.jsonl", rows)
    shape = [o for o in MICRO_SHAPE if not o.startswith(("data=", "data.seq_len"))]
    overrides = [
        "recipe=distill",
        "data=chat",
        f"data.path={path}",
        "data.seq_len=48",
        *shape,
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "recipe.sample_max_new_tokens=4",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={CACHE}",
        "run_name=t",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    summary = run(cfg)
    assert summary["global_step"] == 3
    assert math.isfinite(summary["val/loss"]) and math.isfinite(summary["val/kl_to_teacher"])
    assert summary["data"]["train_blocks"] > 0 and summary["data"]["skipped_rows"]["documents"] == 12
    metrics = next((tmp_path / "outputs" / "t" / "logs").glob("version_*/metrics.csv"))
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert losses and all(math.isfinite(x) for x in losses)


def test_parquet_and_arrow_files_read_like_jsonl(tmp_path, student_tok):
    import datasets

    rows = [{"messages": [{**m, "reasoning_content": m.get("reasoning")} for m in CHAT]} for _ in range(3)]
    rows[1]["messages"][1]["role"] = "bot"
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "chat.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    jsonl = build_chat(ChatDataSpec(path=str(_write(tmp_path / "c.jsonl", rows)), val_fraction=0.0), student_tok)
    for path in (tmp_path / "chat.parquet", arrow):
        data = build_chat(ChatDataSpec(path=str(path), val_fraction=0.0), student_tok)
        assert data.report.skipped == {"unknown_role": 1}
        assert data.report.examples == [
            f"{path}:2: unknown_role: messages[1].role: unknown role 'bot' "
            "(expected one of ('system', 'user', 'assistant'))"
        ]
        assert data.train[:]["input_ids"].tolist() == jsonl.train[:]["input_ids"].tolist()
        assert data.train[:]["labels"].tolist() == jsonl.train[:]["labels"].tolist()


def test_inline_thinking_is_split_by_the_thinking_owner():
    from autoglm_train.data.chat_reader import check_chat_row

    user = {"role": "user", "content": "q"}
    inline = check_chat_row({"messages": [user, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA"}]})
    assert inline["messages"][1] == {"role": "assistant", "content": "A", "reasoning": "hm"}
    named = {"role": "assistant", "content": "A", "reasoning_content": "R", "reasoning": "S"}
    assert check_chat_row({"messages": [user, named]})["messages"][1]["reasoning"] == "R"


def test_batches_carry_ids_mask_and_shifted_labels(tmp_path, student_tok):
    import torch

    from autoglm_train.data.chat_datamodule import ChatDataModule

    path = _write(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    data = ChatDataModule(ChatDataSpec(path=str(path), seq_len=96, batch_size=2, val_fraction=0.0), student_tok)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert all(v.shape == (2, 96) and v.dtype == torch.int64 for v in batch.values())
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    n = int(mask.sum())
    assert (labels[n - 1 :] == IGNORE_INDEX).all() and (ids[n:] == student_tok.pad_token_id).all()
    targets = labels != IGNORE_INDEX
    assert torch.equal(labels[:-1][targets[:-1]], ids[1:][targets[:-1]])  # labels[t] is the token at t + 1
