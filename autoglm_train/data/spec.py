"""The ``data`` config group as a typed, self-checking dataclass (instantiated from ``conf/data/*.yaml``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from autoglm_train.data.reader import TXT_MODES


@dataclass
class BatchingSpec:
    """What every ``data`` source shares: block length, split, batching, bad-row policy, caps and the cache."""

    seq_len: int = 256
    """Tokens per training block (input_ids and labels are both this long)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (split by document, before packing)."""
    batch_size: int = 8
    """Training blocks per batch per device."""
    eval_batch_size: int | None = None
    """Validation blocks per batch; None = ``batch_size``."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process; blocks are cheap memory-mapped reads)."""
    seed: int = 1234
    """Seeds the document split and the per-epoch shuffle (epoch e uses ``seed + e``)."""
    strict: bool = False
    """True: the first bad row is an error naming file and line. False: bad rows are skipped and counted."""
    max_train_blocks: int | None = None
    """Use only the first N training blocks (fast runs); the cache still holds them all."""
    max_val_blocks: int | None = None
    """Use only the first N validation blocks."""
    cache_dir: str = ".cache/data"
    """Built corpora and packed datasets, keyed by everything that changes their content."""

    def check_batching(self) -> None:
        """The shared fields' checks (each subclass's ``__post_init__`` calls it)."""
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len must be >= 8, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1 or null, got {self.eval_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for key in ("max_train_blocks", "max_val_blocks"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1 or null, got {value}")
        if not self.cache_dir:
            raise ValueError("data.cache_dir must be set (built corpora and packed blocks are cached there)")


@dataclass
class TextDataSpec(BatchingSpec):
    """Where the text comes from and how it is cut into training blocks."""

    source: str = "shakespeare"
    """'shakespeare' | 'kjv' (embedded corpora), a local file/directory, or a Hugging Face Hub dataset name."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.parquet/Hub rows; rows with a 'messages' list are chat rows instead."""
    txt_mode: str = "file"
    """'file': each .txt file is one document; 'blocks': each blank-line-separated block is one."""
    hub_split: str = "train"
    """Split to load when ``source`` is a Hub dataset."""

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("data.source is required: 'shakespeare', 'kjv', a local file/dir or a Hub dataset name")
        if self.txt_mode not in TXT_MODES:
            raise ValueError(f"data.txt_mode must be one of {TXT_MODES}, got {self.txt_mode!r}")
        self.check_batching()
