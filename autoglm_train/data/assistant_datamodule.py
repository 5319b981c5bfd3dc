"""``data=assistant`` as the distill task's DataModule: conversation rows, optionally text batches mixed in.

The recipe drives it in three steps, because the teacher (a ``distill`` concern) answers between them:
:meth:`AssistantDataModule.teacher_prompts` (the server's prompt ids of every prompt-only row, train and validation),
then :meth:`~AssistantDataModule.attach_teacher_answers` (one answer per prompt, same order), then ``setup`` builds
the rows (:mod:`autoglm_train.data.assistant`). Validation is the held-back share of the conversations only.

With ``text_share`` > 0 training batches are homogeneous: each is a batch of conversation rows or a batch of packed
text blocks (no cached top-k: the live teacher scores it, as in ``data=shakespeare``). Which one is a coin of
(seed, epoch, batch index) (:class:`MixedLoader`), so a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from autoglm_train.data.assistant import (
    AssistantDataSpec,
    RowTable,
    TeacherTurn,
    build_rows,
    history,
    is_prompt,
    read_conversations,
)
from autoglm_train.data.build import PackedText
from autoglm_train.data.chat import prompt_ids, thinks
from autoglm_train.data.datamodule import TextDataModule
from autoglm_train.data.loader import ResumableLoader
from autoglm_train.data.text import split_documents
from autoglm_train.model.chat_template import bundle_chat_template

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class AssistantDataModule(TextDataModule):
    """Conversation rows for distilling an assistant (``data=assistant``); see the module docstring."""

    def __init__(self, spec: AssistantDataSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(spec, tokenizer)  # type: ignore[arg-type]  # the loaders read only the shared fields
        self.template = bundle_chat_template(tokenizer)
        self._docs: tuple[list[tuple[int, dict]], list[tuple[int, dict]], Any] | None = None
        self._answers: dict[int, tuple[TeacherTurn, bool]] | None = None
        self._teacher_prompts: list[list[int]] | None = None  # what teacher_prompts() asked, to check the answers
        self._thinking: dict[int, bool] = {}  # per prompt-only row: was the teacher asked to think
        self.text = TextDataModule(spec.text, tokenizer) if spec.text_share > 0 else None

    def conversations(self) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
        """(train, validation) ``(source position, conversation)`` pairs, split by conversation (read once)."""
        if self._docs is None:
            docs, report = read_conversations(self.spec)
            train, val = split_documents(list(enumerate(docs)), self.spec.val_fraction, self.spec.seed)
            self._docs = (train, val, report)
        return self._docs[0], self._docs[1]

    def _prompt_positions(self) -> list[int]:
        train, val = self.conversations()
        return sorted(pos for pos, doc in [*train, *val] if is_prompt(doc))

    def teacher_prompts(self, template: str | None = None, teacher_thinks: bool = False) -> list[list[int]]:
        """The ids the teacher answers, one per prompt-only row in source order: the row rendered with the teacher's
        own chat ``template`` (None: the tokenizer's own, which is the teacher's), as the teacher is used.

        Why not the bundle's: a teacher never trained on the bundle's empty think block answers worse after it (the
        embedded SmolLM2 repeats itself or answers ``The answer is: "Paris"``); the student learns the teacher's
        answer after the prompt it is served with. A teacher that thinks (``teacher_thinks``) is asked to think on a
        row's coin (``thinking_share``), and the student's prompt gets the same switch.
        """
        docs = dict(p for p in [*self.conversations()[0], *self.conversations()[1]])
        positions = self._prompt_positions()
        self._thinking = {
            pos: teacher_thinks and thinks(self.spec.seed, pos, self.spec.thinking_share) for pos in positions
        }
        self._teacher_prompts = [
            prompt_ids(self.tokenizer, template, history(docs[pos]), self._thinking[pos]) for pos in positions
        ]
        return self._teacher_prompts

    def attach_teacher_answers(self, answers: Sequence[TeacherTurn]) -> None:
        """The teacher's answers, one per :meth:`teacher_prompts` entry and in its order."""
        positions = self._prompt_positions()
        if len(answers) != len(positions):
            raise ValueError(f"{len(answers)} teacher answers for {len(positions)} prompts")
        asked = self._teacher_prompts
        if asked is None or any(list(a.prompt_ids) != p for a, p in zip(answers, asked, strict=True)):
            raise ValueError("teacher answers do not answer the prompts of teacher_prompts() (stale answers?)")
        self._answers = {pos: (answer, self._thinking[pos]) for pos, answer in zip(positions, answers, strict=True)}

    def prepare_data(self) -> None:
        """Nothing to build ahead: rows are built in memory at ``setup`` (the text mixed in is packed here)."""
        if self.text is not None:
            self.text.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        train_docs, val_docs = self.conversations()
        if self._answers is None and self._prompt_positions():
            raise RuntimeError("data=assistant: attach_teacher_answers() must run before setup() (the recipe does)")
        answers = self._answers or {}
        k = next((a.topk_ids.shape[-1] for a, _ in answers.values()), 1)
        stats = dict.fromkeys(("teacher_rows", "written_rows", "thinking_on", "truncated", "no_target"), 0)
        stats["teacher_tokens"] = 0
        splits = {}
        for split, docs, limit in (("train", train_docs, self.spec.max_train_blocks), ("val", val_docs, None)):
            rows = build_rows(docs, answers, self.spec, self.tokenizer, self.template, stats)
            limit = limit if split == "train" else self.spec.max_val_blocks
            rows = rows[:limit] if limit is not None else rows
            splits[split] = RowTable(rows, self.spec.seq_len, k)
            tokens = int(sum(r["attention_mask"].sum() for r in rows))
            stats |= {f"{split}_docs": len(docs), f"{split}_tokens": tokens, f"{split}_blocks": len(rows)}
        stats["prompts"] = len(answers)
        if self.text is not None:
            self.text.setup(stage)
            stats["text_train_blocks"] = len(self.text.data.train)
        log.info("data %s: assistant rows %s (seq_len %d)", self.spec.source, stats, self.spec.seq_len)
        self._data = PackedText(splits["train"], splits["val"], self._docs[2], stats)  # type: ignore[arg-type]

    def train_dataloader(self) -> ResumableLoader | MixedLoader:
        rows = super().train_dataloader()
        if self.text is None:
            return rows
        text = ResumableLoader(
            self.text.data.train,
            self.spec.batch_size,
            shuffle=True,
            seed=self.spec.seed,
            drop_last=True,
            **self._shard(),
        )
        if len(text) == 0:
            raise ValueError(f"data.text: {len(self.text.data.train)} blocks make no batch of {self.spec.batch_size}")
        rows.epoch_batches = None  # a pass of the mixed loader, not of the rows, is what Lightning counts
        mixed = MixedLoader(rows, text, self.spec.text_share, self.spec.seed)
        mixed.epoch_batches = self._epoch_batches(len(mixed))
        return mixed


class MixedLoader:
    """Conversation batches and text batches interleaved by a seeded coin, with a resumable position.

    A pass is ``ceil(len(rows) / (1 − share))`` batches; batch i of pass e is text when the coin of (seed, e, i) lands
    under ``share``. Each source runs through its own epochs (:class:`ResumableLoader`) as it is drawn from, and the
    state is the pass position plus both sources' states (Lightning's ``_Stateful`` protocol, as the loader's).
    """

    def __init__(self, rows: ResumableLoader, text: ResumableLoader, share: float, seed: int) -> None:
        self.sources = {"rows": rows, "text": text}
        self.share, self.seed = share, seed
        self.epoch_batches: int | None = None
        self._epoch, self._pos, self._continue = 0, 0, True
        self._iters: dict[str, Iterator] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.sources["rows"]) / (1.0 - self.share))

    def _pass_len(self) -> int:
        return len(self) if self.epoch_batches is None else min(len(self), self.epoch_batches)

    def is_text(self, epoch: int, index: int) -> bool:
        """Batch ``index`` of pass ``epoch`` is a text batch: the same on every rank and every rerun."""
        digest = hashlib.sha256(f"{self.seed}:{epoch}:{index}:text".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.share

    def _next(self, name: str) -> dict[str, torch.Tensor]:
        """The next batch of one source, starting its next epoch when one ends."""
        for _ in range(2):
            if name not in self._iters:
                self._iters[name] = iter(self.sources[name])
            try:
                return next(self._iters[name])
            except StopIteration:
                del self._iters[name]
        raise RuntimeError(f"data: the {name} loader yields no batch")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self._continue and self._pos > 0:
            self._epoch, self._pos = self._epoch + 1, 0
        self._continue = False
        return self._run()

    def _run(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self._epoch
        while self._pos < self._pass_len():
            batch = self._next("text" if self.is_text(epoch, self._pos) else "rows")
            self._pos += 1  # counted before yielding, as the loader does: a checkpoint now skips this batch
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, pos = self._epoch, self._pos
        if pos >= self._pass_len():
            epoch, pos = epoch + 1, 0
        return {"epoch": epoch, "batches_done": pos, **{k: s.state_dict() for k, s in self.sources.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, source in self.sources.items():
            source.load_state_dict(state[name])
        self._epoch, self._pos, self._continue = int(state["epoch"]), int(state["batches_done"]), True
        self._iters = {}
