"""``data=assistant``: chat prompts the teacher answers, solver-written reasoning rows, optionally text, as rows.

Two kinds of conversation make one training set (issue 28):

* **prompt-only rows** (the last turn is a user turn): the teacher writes the assistant turn (sequence-level KD,
  :mod:`autoglm_train.distill.teacher_answers`, run by the recipe). Row = the server's prompt ids + the teacher's
  answer ids; labels on the answer; the teacher's cached top-k sits in ``topk_ids``/``topk_logprobs`` at the label
  positions (the row for answer token j at t = len(prompt) − 1 + j, since ``labels[t] = ids[t + 1]``), and
  ``kd_weight`` is 1 there: token-level KD + CE. Earlier assistant turns of a multi-turn prompt are targets as the
  template renders them (CE only, ``kd_weight`` 0: no teacher logits for them).
* **written rows** (an assistant turn is there, e.g. the built-in verifiable families, whose solver writes the worked
  steps as ``reasoning_content``): used as written with :func:`~autoglm_train.data.chat.encode_conversation`,
  thinking-on with probability ``thinking_share`` (the per-row :func:`~autoglm_train.data.chat.thinks` coin), else
  thinking-off with the template's empty think block; zero top-k columns and ``kd_weight`` 0: CE only. A ``source``
  field is not read: no teacher logits exist for a written turn, whoever wrote it.

Every row has the same columns (``input_ids``, ``attention_mask``, ``labels`` [T] int64, ``kd_weight`` [T] float32,
``topk_ids`` [T, k] int32, ``topk_logprobs`` [T, k] float32, ``prompt_len`` int64), so every batch does. Prompts come
from ``prompts: builtin`` (the default sets, :func:`~autoglm_train.data.assistant_prompts.write_prompt_sets`, written
once under ``<cache_dir>/assistant/<key>`` and reused; the held-out sets beside them are never read here) or a path /
Hub id of ``messages`` rows read with the chat reader (bad rows reported and skipped as everywhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autoglm_train.data.chat import encode_conversation, prompt_ids, thinks, to_row
from autoglm_train.data.chat_reader import read_chat
from autoglm_train.data.reader import ReadReport
from autoglm_train.data.spec import BatchingSpec, TextDataSpec

BUILTIN = "builtin"
TRAIN_FILES = ("train_chat.jsonl", "train_verifiable.jsonl")


@dataclass
class AssistantDataSpec(BatchingSpec):
    """Where the assistant's conversations come from and how they become rows (``conf/data/assistant.yaml``)."""

    prompts: str = BUILTIN
    """``builtin`` (the default prompt sets, generated once) or a .jsonl/.parquet/.arrow file, a directory of them,
    or a Hub dataset id of ``messages`` rows."""
    messages_field: str = "messages"
    """Column holding the conversation when ``prompts`` is a path."""
    hub_split: str = "train"
    """Split to load when ``prompts`` is a Hub dataset."""
    chat_train: int = 2000
    """Built-in general chat prompts to train on (the teacher answers them)."""
    verifiable_train: int = 2000
    """Built-in verifiable questions with solver-written worked steps."""
    families: list[str] | None = None
    """Verifiable task families to draw from (None = all of them)."""
    thinking_share: float = 0.5
    """Share of written rows with reasoning rendered thinking-on (the rest thinking-off, the empty think block)."""
    text_share: float = 0.0
    """Probability that a training batch is a batch of ``text`` blocks instead (0 = conversations only)."""
    text: TextDataSpec | None = None
    """The text mixed in (e.g. the embedded Shakespeare); its block length, batch size and seed are this spec's."""

    def __post_init__(self) -> None:
        if isinstance(self.prompts, os.PathLike):
            self.prompts = os.fspath(self.prompts)
        if not isinstance(self.prompts, str) or not self.prompts.strip():
            raise ValueError("data.prompts is required: 'builtin' or a file/directory/Hub id of `messages` rows")
        if self.chat_train < 0 or self.verifiable_train < 0:
            raise ValueError(f"data.chat_train={self.chat_train} and data.verifiable_train must be >= 0")
        for key in ("thinking_share", "text_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.text_share >= 1.0:
            raise ValueError("data.text_share must be < 1: the conversations are the point of data=assistant")
        if self.text_share > 0 and self.text is None:
            raise ValueError(f"data.text_share={self.text_share} > 0 needs data.text (e.g. source: shakespeare)")
        if self.families is not None:
            self.families = [str(f) for f in self.families]
        if self.text is not None:  # batches are homogeneous in shape: text blocks as long as the rows
            self.text = replace(self.text, seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed)
        self.check_batching()

    @property
    def source(self) -> str:
        """Where the conversations come from (run summaries read it)."""
        return self.prompts


class TeacherTurn(Protocol):
    """What a row needs of a teacher answer (:class:`~autoglm_train.distill.answer_cache.TeacherAnswer`)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def builtin_prompts_dir(spec: AssistantDataSpec) -> Path:
    """The default prompt sets for these sizes and seed, generated on first use (atomically) and reused after."""
    from autoglm_train.data.assistant_prompts import prompt_sets_fingerprint, write_prompt_sets
    from autoglm_train.data.verifiable.families import FAMILIES

    families = list(spec.families or FAMILIES)
    sizes = {"chat_train": spec.chat_train, "verifiable_train": spec.verifiable_train, "families": families}
    made_from = {**sizes, "seed": spec.seed, "sources": prompt_sets_fingerprint()}
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    out = Path(spec.cache_dir) / "assistant" / key[:16]
    if (out / "sources.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_prompt_sets(tmp, seed=spec.seed, **sizes)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: its sets are the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_conversations(spec: AssistantDataSpec) -> tuple[list[dict], ReadReport]:
    """Checked conversations in source order (prompt-only rows included) and what the reader skipped."""
    kw = {"field": spec.messages_field, "hub_split": spec.hub_split, "strict": spec.strict, "prompt_only_ok": True}
    if spec.prompts != BUILTIN:
        result = read_chat(spec.prompts, **kw)
        return result.documents, result.report
    root = builtin_prompts_dir(spec)
    docs: list[dict] = []
    report = ReadReport(source=f"builtin:{root}")
    for name in TRAIN_FILES:
        if not (root / name).is_file() or (root / name).stat().st_size == 0:  # chat_train=0 / verifiable_train=0
            continue
        part = read_chat(str(root / name), **kw)
        docs += part.documents
        report.files += part.report.files
        report.documents += part.report.documents
        for kind, n in part.report.skipped.items():
            report.skipped[kind] = report.skipped.get(kind, 0) + n
        report.examples += part.report.examples
    return docs, report


def is_prompt(doc: dict) -> bool:
    """A prompt-only conversation: the teacher writes its answer."""
    return doc["messages"][-1]["role"] == "user"


def history(doc: dict) -> list[dict[str, str]]:
    """The prompt's messages as the server receives them (role and content)."""
    return [{"role": m["role"], "content": m["content"]} for m in doc["messages"]]


def teacher_row(
    tokenizer, template: str, doc: dict, answer: TeacherTurn, seq_len: int, thinking: bool = False
) -> dict[str, Any] | None:
    """The row of a prompt (rendered with the bundle's ``template``, as served, with the ``thinking`` switch the
    teacher was asked with) and the teacher's answer ids (see the module docstring); None if no answer token fits."""
    placeholder = {"role": "assistant", "content": "."}  # only the prompt part of the encoding is kept
    ids, target, p = encode_conversation(tokenizer, template, [*history(doc), placeholder], False)
    if thinking:  # the open generation prompt: the thinking-off one without its empty think block
        ids = prompt_ids(tokenizer, template, history(doc), True)
        target, p = target[: len(ids)], len(ids)
    prompt, prompt_target = ids[:p], target[:p]
    answer_ids = list(answer.answer_ids)
    row = to_row(prompt + answer_ids, prompt_target + [True] * len(answer_ids), seq_len, tokenizer.pad_token_id)
    if row is None:
        return None
    n = max(0, min(len(answer_ids), seq_len - p))  # answer tokens whose label position t = p - 1 + j < seq_len - 1
    row["kd_weight"] = np.zeros(seq_len, np.float32)
    row["kd_weight"][p - 1 : p - 1 + n] = 1.0
    row["topk"] = (p - 1, np.asarray(answer.topk_ids[:n], np.int32), np.asarray(answer.topk_logprobs[:n], np.float32))
    row["prompt_len"], row["full_len"] = p, p + len(answer_ids)
    return row


def written_row(tokenizer, template: str, doc: dict, thinking: bool, seq_len: int) -> dict[str, Any] | None:
    """The row of a conversation used as written: CE on its assistant tokens, no teacher signal."""
    ids, target, p = encode_conversation(tokenizer, template, doc["messages"], thinking)
    row = to_row(ids, target, seq_len, tokenizer.pad_token_id)
    if row is None:
        return None
    row["kd_weight"] = np.zeros(seq_len, np.float32)
    row["topk"], row["prompt_len"], row["full_len"] = None, p, len(ids)
    return row


class RowTable:
    """Rows as a map-style dataset; top-k kept for the answer tokens only and laid out [T, k] when a row is read."""

    def __init__(self, rows: list[dict[str, Any]], seq_len: int, k: int) -> None:
        self.rows, self.seq_len, self.k = rows, seq_len, k

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self.rows[i]
        ids = np.zeros((self.seq_len, self.k), np.int32)
        logprobs = np.zeros((self.seq_len, self.k), np.float32)
        if row["topk"] is not None:
            start, top_ids, top_lp = row["topk"]
            ids[start : start + len(top_ids)] = top_ids
            logprobs[start : start + len(top_lp)] = top_lp
        out = {key: row[key] for key in ("input_ids", "attention_mask", "labels", "kd_weight")}
        return {**out, "topk_ids": ids, "topk_logprobs": logprobs, "prompt_len": np.int64(row["prompt_len"])}


def build_rows(
    docs: list[tuple[int, dict]],
    answers: dict[int, tuple[TeacherTurn, bool]],
    spec: AssistantDataSpec,
    tokenizer,
    template: str,
    stats: dict[str, int],
) -> list[dict[str, Any]]:
    """Rows of ``docs`` ((source position, conversation) pairs), the prompts' answers looked up by position."""
    rows = []
    for position, doc in docs:
        if is_prompt(doc):
            answer, thinking = answers[position]
            row = teacher_row(tokenizer, template, doc, answer, spec.seq_len, thinking)
            kind = "teacher_rows"
        else:
            on = thinks(spec.seed, position, spec.thinking_share)
            stats["thinking_on"] += on and "reasoning" in doc["messages"][-1]
            row = written_row(tokenizer, template, doc, on, spec.seq_len)
            kind = "written_rows"
        if row is None:
            stats["no_target"] += 1
            continue
        stats["truncated"] += row["full_len"] > spec.seq_len
        stats[kind] += 1
        stats["teacher_tokens"] += int(row["kd_weight"].sum())
        rows.append(row)
    return rows
