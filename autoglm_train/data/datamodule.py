"""Lightning DataModule for packed text: builds/loads the cached blocks and serves resumable loaders.

Batches are ``{"input_ids": int64 [B, seq_len], "labels": int64 [B, seq_len]}`` with ``labels[:, t]`` the target of
position t (already shifted). There is no ``attention_mask``: packed blocks have no padding, and leaving it out
lets the model use its plain causal path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L

from autoglm_train.data.build import PackedText, build_packed
from autoglm_train.data.loader import ResumableLoader
from autoglm_train.data.reader import ReadReport
from autoglm_train.data.spec import TextDataSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TextDataModule", "TextDataSpec"]  # TextDataSpec is re-exported: conf/data/*.yaml target it here


class TextDataModule(L.LightningDataModule):
    """Packed text blocks for causal-LM training and distillation.

    Args:
        spec: the ``data`` config (``conf/data/*.yaml`` instantiates it).
        tokenizer: the student's tokenizer (in distillation it is shared with the teacher).
    """

    def __init__(self, spec: TextDataSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.spec = spec
        self.tokenizer = tokenizer
        self._data: PackedText | None = None
        self._train_columns: Any = None

    def attach_train_columns(self, columns: Any) -> None:
        """Extra per-block columns for training (e.g. the teacher's cached top-k), aligned with ``data.train``."""
        self._train_columns = columns

    def prepare_data(self) -> None:
        """Build the corpus and packed cache once (Lightning runs this on one process per node)."""
        build_packed(self.spec, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached blocks (building them if ``prepare_data`` did not run, e.g. outside a Trainer)."""
        if self._data is None:
            self._data = build_packed(self.spec, self.tokenizer)

    @property
    def data(self) -> PackedText:
        if self._data is None:
            raise RuntimeError("TextDataModule.setup() has not run yet")
        return self._data

    @property
    def report(self) -> ReadReport:
        """What the reader kept and skipped (per kind, with first locations), for the run summary."""
        return self.data.report

    @property
    def stats(self) -> dict[str, int]:
        """Documents, tokens and blocks per split (before the ``max_*_blocks`` caps)."""
        return self.data.stats

    def _shard(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": trainer.global_rank, "world_size": trainer.world_size}

    def _epoch_batches(self, num_batches: int) -> int | None:
        """Mirror Lightning's ``limit_train_batches`` so a cut-short pass still ends an epoch of this loader."""
        limit = self.trainer.limit_train_batches if self.trainer is not None else None
        if isinstance(limit, int):
            return min(num_batches, limit)
        if isinstance(limit, float) and limit < 1.0:
            return int(num_batches * limit)
        return None

    def train_dataloader(self) -> ResumableLoader:
        train = self.data.train
        if self._train_columns is not None:
            from datasets import concatenate_datasets

            if len(self._train_columns) != len(train):
                raise ValueError(f"extra train columns have {len(self._train_columns)} rows, train has {len(train)}")
            train = concatenate_datasets([train, self._train_columns], axis=1).with_format("numpy")
        loader = ResumableLoader(
            train,
            self.spec.batch_size,
            shuffle=True,
            seed=self.spec.seed,
            drop_last=True,
            num_workers=self.spec.num_workers,
            pin_memory=self.spec.num_workers > 0 and self._on_gpu(),
            **self._shard(),
        )
        if len(loader) == 0:
            raise ValueError(
                f"data: {len(self.data.train)} training blocks make no batch of data.batch_size={self.spec.batch_size}"
                f" per device; lower data.seq_len or data.batch_size, or use more text"
            )
        loader.epoch_batches = self._epoch_batches(len(loader))
        return loader

    def val_dataloader(self) -> ResumableLoader | list[Any]:
        if len(self.data.val) == 0:
            return []  # no held-out blocks (val_fraction=0 or tiny corpus): Lightning skips validation
        return ResumableLoader(
            self.data.val,
            self.spec.eval_batch_size or self.spec.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.spec.num_workers,
            pin_memory=self.spec.num_workers > 0 and self._on_gpu(),
            **self._shard(),
        )

    def _on_gpu(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"


def calibration_batches(dataset: Any, blocks: int, batch_size: int) -> list[dict[str, Any]]:
    """The first ``blocks`` rows of a packed split as batches of ``batch_size`` (deterministic: same on every rank).

    What ``student.init=teacher`` measures the teacher's importance on (:mod:`autoglm_train.distill.importance`).
    """
    from autoglm_train.data.loader import fetch_batch

    n = min(blocks, len(dataset))
    return [fetch_batch(dataset, list(range(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]
