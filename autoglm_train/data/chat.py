"""Conversations as training rows: rendered as the bundle serves them, loss on assistant tokens only.

The student is a chat assistant, so what it learns must be what the server will ask of it. A conversation is
cut at its last assistant turn; everything before that turn is rendered by :func:`~autoglm_train.model.
prompt_format.render_chat` with the bundle's chat template (:func:`~autoglm_train.model.chat_template.
bundle_chat_template`, the function the export writes into the bundle) and the generation prompt, and tokenized
alone: the very ids the server builds for the same messages and thinking switch. The answer follows: the
reasoning in think tags and the answer when the row thinks (:func:`~autoglm_train.model.thinking.
thinking_answer`; the prompt was rendered with ``enable_thinking=true``), the answer alone after the template's
empty think block when it does not (``enable_thinking=false``), then the end-of-turn token.

Labels (``-100`` = no loss, shifted as the packed text's) mark the answer and its end-of-turn token, and the
contents (+ end-of-turn) of earlier assistant turns as the template renders them in the history (their
reasoning dropped, as the template drops it); system and user tokens and the role headers never count.

Rows longer than ``seq_len`` tokens are truncated at the block end (counted as ``truncated``); a row whose
block then holds no target token is skipped (counted as ``no_target``). Shorter rows are padded
(``attention_mask`` 0, labels -100).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoglm_train.data.spec import BatchingSpec
from autoglm_train.model.prompt_format import end_of_turn_id, render_chat
from autoglm_train.model.thinking import thinking_answer

IGNORE_INDEX = -100


@dataclass
class ChatDataSpec(BatchingSpec):
    """Where the conversations come from and how they become training rows (``conf/data/chat.yaml``)."""

    path: str = ""
    """A local .jsonl/.parquet/.arrow file (or a directory of them), or a Hugging Face Hub dataset id."""
    messages_field: str = "messages"
    """Column holding the conversation (a list of ``{"role", "content"[, "reasoning_content"]}``)."""
    hub_split: str = "train"
    """Split to load when ``path`` is a Hub dataset."""
    thinking_share: float = 0.5
    """Share of rows with reasoning rendered thinking-on (the rest thinking-off, reasoning dropped); per row,
    deterministic from ``seed`` and the row's position."""

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError("data.path is required: a .jsonl/.parquet/.arrow file of `messages` rows or a Hub id")
        if not 0.0 <= self.thinking_share <= 1.0:
            raise ValueError(f"data.thinking_share must be in [0, 1], got {self.thinking_share}")
        self.check_batching()

    @property
    def source(self) -> str:
        """The text spec's name for where data come from (run summaries read it)."""
        return self.path


def thinks(seed: int, row: int, share: float) -> bool:
    """The row's thinking coin: a hash of (seed, row position), so every process and rerun draws the same."""
    digest = hashlib.sha256(f"{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _history_spans(tokenizer, template: str, history: list[dict[str, str]], kwargs: dict[str, Any]) -> list[tuple]:
    """Character spans of each earlier assistant turn's content + end-of-turn in the rendered history."""
    spans = []
    for j, turn in enumerate(history):
        if turn["role"] != "assistant":
            continue
        before = _render_history(tokenizer, template, history[:j], kwargs)
        after = _render_history(tokenizer, template, history[: j + 1], kwargs)
        segment = after[len(before) :].rstrip()
        if not turn["content"]:
            continue  # an empty earlier answer: nothing of it to learn
        at = segment.rfind(turn["content"]) if after.startswith(before) else -1  # the content, not the header
        if at < 0:
            raise ValueError("the chat template does not render an assistant turn's content as a suffix of its history")
        spans.append((len(before) + at, len(before) + len(segment)))
    return spans


def _render_history(tokenizer, template: str, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def prompt_ids(tokenizer, template: str, history: list[dict[str, str]], enable_thinking: bool) -> list[int]:
    """The ids the server builds for ``history`` (ending with the user turn) and the thinking switch: what a teacher
    answers after and what the student's answer follows in training."""
    prompt = render_chat(tokenizer, template, history, {"enable_thinking": enable_thinking})
    return tokenizer(prompt, add_special_tokens=False).input_ids


def encode_conversation(
    tokenizer, template: str, messages: list[dict[str, str]], thinking: bool
) -> tuple[list[int], list[bool], int]:
    """``(ids, is_target, prompt_len)`` of one conversation (untruncated); ``ids[:prompt_len]`` is the server's prompt.

    Args:
        tokenizer: the student tokenizer (a fast one: earlier assistant turns are found by character offsets).
        template: the bundle's chat template.
        messages: a checked conversation (:func:`~autoglm_train.data.chat_reader.check_chat_row`).
        thinking: render the last assistant turn's reasoning (if it has any) thinking-on.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    reasoning = messages[last].get("reasoning")
    kwargs = {"enable_thinking": bool(thinking and reasoning)}
    prompt = render_chat(tokenizer, template, history, kwargs)
    spans = _history_spans(tokenizer, template, history, kwargs)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    target = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    content = messages[last]["content"]
    answer = thinking_answer(reasoning, content) if kwargs["enable_thinking"] else content
    answer_ids = [*tokenizer(answer, add_special_tokens=False).input_ids, end_of_turn_id(tokenizer)]
    return [*enc["input_ids"], *answer_ids], [*target, *[True] * len(answer_ids)], len(enc["input_ids"])


def to_row(ids: list[int], target: list[bool], seq_len: int, pad_id: int) -> dict[str, np.ndarray] | None:
    """Truncate/pad to ``seq_len`` and shift: ``labels[t]`` is ``ids[t + 1]`` where that token is a target.

    None when the block holds no target (the assistant turn starts past the block end).
    """
    ids, target = ids[:seq_len], target[:seq_len]
    n = len(ids)
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    input_ids[:n] = ids
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    shifted = np.asarray(target[1:], dtype=bool)
    labels[: n - 1][shifted] = input_ids[1:n][shifted]
    if not shifted.any():
        return None
    mask = np.zeros(seq_len, dtype=np.int64)
    mask[:n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
