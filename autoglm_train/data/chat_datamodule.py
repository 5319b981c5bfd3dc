"""``data=chat``: conversations as the distill task's batches (the text DataModule's loaders, chat rows inside).

Batches are ``{"input_ids", "attention_mask", "labels"}`` int64 ``[B, seq_len]``, labels shifted and ``-100``
outside assistant tokens (:mod:`autoglm_train.data.chat`), so the KD and CE losses, which skip ``-100``,
count assistant tokens only. Everything else (resumable shuffling, sharding, the run summary's ``stats`` and
``report``) is :class:`~autoglm_train.data.datamodule.TextDataModule`'s.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from autoglm_train.data.build import PackedText
from autoglm_train.data.chat import ChatDataSpec, encode_conversation, thinks, to_row
from autoglm_train.data.chat_reader import read_chat
from autoglm_train.data.datamodule import TextDataModule
from autoglm_train.data.text import split_documents
from autoglm_train.model.chat_template import bundle_chat_template

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
COLUMNS = ("input_ids", "attention_mask", "labels")


def _rows(docs: list[tuple[int, dict]], spec: ChatDataSpec, tokenizer, template: str, stats: dict[str, int]):
    rows = []
    for position, doc in docs:
        on = thinks(spec.seed, position, spec.thinking_share)
        has_reasoning = "reasoning" in [m for m in doc["messages"] if m["role"] == "assistant"][-1]
        ids, target, _ = encode_conversation(tokenizer, template, doc["messages"], on)
        stats["truncated"] += len(ids) > spec.seq_len
        stats["thinking_on"] += on and has_reasoning
        row = to_row(ids, target, spec.seq_len, tokenizer.pad_token_id)
        if row is None:
            stats["no_target"] += 1
            continue
        rows.append(row)
    return rows


def _dataset(rows: list[dict[str, np.ndarray]], seq_len: int, limit: int | None) -> datasets.Dataset:
    import datasets

    rows = rows[:limit] if limit is not None else rows
    columns = {k: np.stack([r[k] for r in rows]) if rows else np.zeros((0, seq_len), np.int64) for k in COLUMNS}
    return datasets.Dataset.from_dict({k: list(v) for k, v in columns.items()}).with_format("numpy")


def build_chat(spec: ChatDataSpec, tokenizer: PreTrainedTokenizerBase) -> PackedText:
    """Read, check, split by conversation, render with the bundle's template, and mask (kept in memory)."""
    result = read_chat(spec.path, field=spec.messages_field, hub_split=spec.hub_split, strict=spec.strict)
    template = bundle_chat_template(tokenizer)
    train_docs, val_docs = split_documents(list(enumerate(result.documents)), spec.val_fraction, spec.seed)
    stats = {"truncated": 0, "no_target": 0, "thinking_on": 0}
    splits = {}
    for split, docs, limit in (("train", train_docs, spec.max_train_blocks), ("val", val_docs, spec.max_val_blocks)):
        rows = _rows(docs, spec, tokenizer, template, stats)
        splits[split] = _dataset(rows, spec.seq_len, limit)
        tokens = int(sum(r["attention_mask"].sum() for r in rows))
        stats |= {f"{split}_docs": len(docs), f"{split}_tokens": tokens, f"{split}_blocks": len(rows)}
    log.info("data %s: chat rows %s (seq_len %d)", spec.path, stats, spec.seq_len)
    return PackedText(splits["train"], splits["val"], result.report, stats)


class ChatDataModule(TextDataModule):
    """Conversation rows for distillation (``data=chat``); see the module docstring for the batch layout."""

    def __init__(self, spec: ChatDataSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(spec, tokenizer)  # type: ignore[arg-type]  # the loaders read only the shared fields
        self.template = bundle_chat_template(tokenizer)

    def prepare_data(self) -> None:
        """Nothing to build ahead: rows are rendered in memory at ``setup``."""

    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            self._data = build_chat(self.spec, self.tokenizer)
