"""Pairs → plugin inputs + token ids, split into train / val / held-out test, batched for a PluginTask.

Every item goes through the plugin's own ``preprocess`` once, at setup: an item the plugin
rejects (corrupt, empty, malformed) is skipped and counted with the plugin's reason, so
training never meets a bad item. Batches carry:

* ``media`` ``[B, ...]``: the plugin inputs (zero-padded along dim 0 where the plugin unpads items);
* ``input_ids`` / ``attention_mask`` ``[B, T]``: prompt + answer + end of turn, right-padded. The prompt is the
  chat conversation a client sends (a user turn with the question and the media placeholders), rendered by
  :class:`~autoglm_train.model.prompt_format.PromptFormat` exactly as the server renders a request; the
  training split holds every item once per content order (text first, media first);
* ``labels`` ``[B, T]``: the target of each position (already shifted), -100 outside the answer;
* ``prompt_ids`` / ``prompt_mask``: the prompt only, left-padded for batched generation;
* ``answers`` / ``digit_labels``: the reference texts (and digit labels or None) for generation metrics.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from autoglm_train.data.loader import ResumableLoader
from autoglm_train.data.multimodal.pairs import Pair
from autoglm_train.data.multimodal.report import SkipReport
from autoglm_train.data.multimodal.spec import PairDataSpec
from autoglm_train.model.plugin import ModalityPlugin
from autoglm_train.model.prompt_format import ORDERS, PromptFormat

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")


@dataclass
class EncodedPairs(Dataset):
    """One split, ready to batch: plugin inputs and token ids per item."""

    media: list[torch.Tensor]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    answers: list[str]
    digit_labels: list[str | None]

    def __len__(self) -> int:
        return len(self.media)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "media": self.media[index],
            "prompt_ids": self.prompt_ids[index],
            "answer_ids": self.answer_ids[index],
            "answer": self.answers[index],
            "digit_label": self.digit_labels[index],
        }


class PairDataModule(L.LightningDataModule):
    """Media → text pairs for one plugin.

    Args:
        spec: the ``data_mm`` config.
        plugin: the plugin being trained (its ``preprocess``, ``placeholder``, ``num_tokens`` are used).
        tokenizer: the frozen decoder's tokenizer.
    """

    def __init__(self, spec: PairDataSpec, plugin: ModalityPlugin, tokenizer) -> None:
        super().__init__()
        self.spec = spec
        self.plugin = plugin
        self.tokenizer = tokenizer
        self.prompt_format = PromptFormat.for_tokenizer(
            tokenizer, spec.enable_thinking, tuple(spec.orders), spec.media_at, (plugin.placeholder,)
        )
        """How every example is rendered: recorded in the plugin's artifact, used by the server."""
        self.report = SkipReport(strict=spec.strict)
        self.splits: dict[str, EncodedPairs] = {}
        self._items: dict[str, list[tuple[Pair, torch.Tensor]]] = {}

    # --- building ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        pairs = self.spec.source.load(self.report)
        usable = self._preprocess(pairs)
        self._items = split_pairs(usable, self.spec)
        # training sees every item in each trained content order (with media_at=answer the orders render the same
        # tokens, so once is enough); val/test in the first order, the one evaluated
        orders = self.prompt_format.orders
        train_orders = orders if self.prompt_format.media_at == "turn" else orders[:1]
        self.splits = {
            name: self._encode(part, train_orders if name == "train" else orders[:1])
            for name, part in self._items.items()
        }
        self.report.log_summary(f"data_mm ({type(self.spec.source).__name__})")
        log.info("data_mm splits (items): %s", {name: len(items) for name, items in self._items.items()})
        if not len(self.splits["train"]) or not len(self.splits["test"]):
            reasons = ", ".join(f"{r} x{n}" for r, n in self.report.skipped.most_common(3)) or "none"
            raise ValueError(
                f"data_mm: {len(usable)} usable pairs of {self.report.seen} seen is too few for train and test "
                f"splits (skip reasons: {reasons}); is the data {self.spec.source.modality} data for plugin "
                f"'{self.plugin.name}'?"
            )

    def _preprocess(self, pairs: list[Pair]) -> list[tuple[Pair, torch.Tensor]]:
        """The plugin's preprocessing, in chunks; a chunk that fails is retried item by item."""
        out: list[tuple[Pair, torch.Tensor]] = []
        step = self.spec.preprocess_chunk
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            try:
                batch = self.plugin.preprocess([p.media for p in chunk])
                out += [(p, self.plugin.unpad(x)) for p, x in zip(chunk, batch, strict=True)]
            except ValueError:
                for pair in chunk:
                    try:
                        out.append((pair, self.plugin.unpad(self.plugin.preprocess([pair.media])[0])))
                    except ValueError as err:
                        self.report.skip(f"rejected by plugin {self.plugin.name}", f"{pair.where}: {err}")
        return out

    def _encode(self, items: list[tuple[Pair, torch.Tensor]], orders: tuple[str, ...]) -> EncodedPairs:
        """Each item as a chat example in each of ``orders`` (order-major: all items text-first, then media-first)."""
        media_text = self.plugin.placeholder * self.plugin.num_tokens
        encoded = EncodedPairs([], [], [], [], [])
        for order in orders:
            for pair, media in items:
                prompt_ids, answer_ids = self.prompt_format.example(
                    self.tokenizer, pair.question, media_text, pair.answer, order
                )
                encoded.media.append(media)
                encoded.prompt_ids.append(prompt_ids)
                encoded.answer_ids.append(answer_ids)
                encoded.answers.append(pair.answer)
                encoded.digit_labels.append(pair.label)
        return encoded

    def heldout_loader(self, order: str) -> DataLoader:
        """The held-out (test) split with its prompts in content order ``order``."""
        if order not in ORDERS:
            raise ValueError(f"content order {order!r}: expected one of {ORDERS}")
        return DataLoader(
            self._encode(self._items["test"], (order,)), self.spec.eval_batch_size, collate_fn=self.collate
        )

    # --- loaders -----------------------------------------------------------------------
    def train_dataloader(self) -> ResumableLoader:
        """Seeded, sharded over ranks, and resumable mid-epoch (its position is saved with every checkpoint)."""
        trainer = self.trainer
        return ResumableLoader(
            self.splits["train"],
            self.spec.batch_size,
            shuffle=True,
            seed=self.spec.seed,
            drop_last=len(self.splits["train"]) > self.spec.batch_size,
            collate_fn=self.collate,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.spec.eval_batch_size, collate_fn=self.collate)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows → one batch (see the module docstring for the keys)."""
        pad = self.tokenizer.pad_token_id
        full = [torch.tensor(r["prompt_ids"] + r["answer_ids"]) for r in rows]
        input_ids = pad_sequence(full, batch_first=True, padding_value=pad)
        attention_mask = pad_sequence([torch.ones_like(x) for x in full], batch_first=True)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, r in enumerate(rows):
            start = len(r["prompt_ids"]) - 1  # the last prompt position predicts the first answer token
            labels[row, start : start + len(r["answer_ids"])] = torch.tensor(r["answer_ids"])
        prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], pad)
        return {
            "media": pad_sequence([r["media"] for r in rows], batch_first=True),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "answers": [r["answer"] for r in rows],
            "digit_labels": [r["digit_label"] for r in rows],
        }

    @property
    def max_answer_tokens(self) -> int:
        """The longest training answer in tokens (end of turn excluded): the default greedy generation budget."""
        return max((len(ids) - 1 for ids in self.splits["train"].answer_ids), default=1)

    def heldout_items(self) -> list[Pair]:
        """The held-out pairs as loaded (raw media), in the order the evaluation scores them."""
        return [pair for pair, _ in self._items["test"]]

    def report_dict(self) -> dict[str, Any]:
        """Skips, items per split, and training examples (each item once per content order)."""
        return {
            **self.report.to_dict(),
            "splits": {name: len(items) for name, items in self._items.items()},
            "train_examples": len(self.splits["train"]),
        }


def left_pad(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` with every sequence right-aligned: batched generation continues all rows at once."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def split_pairs(items: list, spec: PairDataSpec) -> dict[str, list]:
    """A seeded shuffle cut into test, val and train (in that order), with the val/test caps applied."""
    order = list(range(len(items)))
    random.Random(spec.seed).shuffle(order)
    n_test = max(1, round(len(items) * spec.test_fraction)) if items else 0
    n_val = round(len(items) * spec.val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if spec.max_test_items is not None:
        test = test[: spec.max_test_items]
    if spec.max_val_items is not None:
        val = val[: spec.max_val_items]
    return {"train": [items[i] for i in train], "val": [items[i] for i in val], "test": [items[i] for i in test]}
