"""The micro `recipe=distill` run shared by the recipe tests, the pipeline tests and benchmarks/fault_inject.py.

A 3M-parameter student on 12 real Shakespeare documents, so a run takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

MICRO_SHAPE = (
    "data=local",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.val_fraction=0.2",
    "data.max_val_blocks=4",
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.intermediate_size=128",
    "loss.chunk_size=16",
)
"""Hydra overrides for the micro student and its data (add ``data.source=<corpus>`` and the run's steps)."""


def write_micro_corpus(path: Path) -> Path:
    """A small real corpus at ``path``: the first 12 Shakespeare documents, 1,500 characters each."""
    from autoglm_train.data.corpora import corpus_documents

    docs = [d for _, d in zip(range(12), corpus_documents("shakespeare"), strict=False)]
    path.write_text("".join(json.dumps({"text": d[:1500]}) + "\n" for d in docs))
    return path
