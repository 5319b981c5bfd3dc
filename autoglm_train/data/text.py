"""Documents → token stream → fixed blocks: held-out split, chat template, tokenize, pack.

Label convention (what the distillation loss expects): each block holds ``input_ids`` [seq_len] and ``labels``
[seq_len] with ``labels[t]`` the target of position t, i.e. the stream shifted left by one. Blocks are cut from
one token stream with stride ``seq_len``, so block i's last label is block i+1's first input: every token after
the first is a target exactly once and no model-side shift is needed. Documents are separated by EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from autoglm_train.data.reader import Document

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
TOKEN_DTYPE = np.int32  # every real vocabulary fits, and it halves the cache against int64


def split_documents(docs: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle documents with ``seed`` and hold out ``round(n · val_fraction)`` of them (at least 1 if asked).

    Splitting whole documents, before tokenizing, is what keeps held-out text out of training blocks.
    The train list comes back shuffled so packed blocks mix works.
    """
    n = len(docs)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def render_documents(docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Plain text as is; chat rows through the tokenizer's chat template (as text, tokenized later in batches)."""
    texts = []
    for doc in docs:
        if "text" in doc:
            texts.append(doc["text"])
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the data has chat rows ('messages') but tokenizer {tokenizer.name_or_path!r} has no chat_template"
            )
        texts.append(tokenizer.apply_chat_template(doc["messages"], tokenize=False))
    return texts


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The document separator; packing without one would run documents into each other."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; packing separates documents with it")
    return int(tokenizer.eos_token_id)


def tokenize_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, *, fingerprint: str | None = None
) -> datasets.Dataset:
    """Tokenize each text (no special tokens: templates carry their own) and append EOS; column ``input_ids``."""
    import datasets

    eos = eos_id(tokenizer)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [[*x, eos] for x in ids]}

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    if not texts:  # map() on zero rows would keep the input schema
        return datasets.Dataset.from_dict({"input_ids": []}, features=features)
    return datasets.Dataset.from_dict({"text": texts}).map(
        encode,
        batched=True,
        batch_size=256,
        remove_columns=["text"],
        features=features,
        new_fingerprint=fingerprint,  # an explicit fingerprint skips hashing the tokenizer closure
        desc="tokenize",
    )


def token_stream(tokenized: datasets.Dataset) -> np.ndarray:
    """All documents' ids concatenated in dataset order, as one flat int32 array."""
    column = tokenized.flatten_indices().data.table.column("input_ids")
    return pc.list_flatten(column).to_numpy().astype(TOKEN_DTYPE, copy=False)


def pack_blocks(stream: np.ndarray, seq_len: int) -> datasets.Dataset:
    """Cut the stream into ``(len - 1) // seq_len`` blocks of ``input_ids`` and shifted ``labels``; drop the tail."""
    import datasets

    n_blocks = max(0, (len(stream) - 1) // seq_len)
    end = n_blocks * seq_len
    inputs = pa.array(np.ascontiguousarray(stream[:end], dtype=TOKEN_DTYPE))
    labels = pa.array(np.ascontiguousarray(stream[1 : end + 1], dtype=TOKEN_DTYPE))
    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(inputs, seq_len),
            "labels": pa.FixedSizeListArray.from_arrays(labels, seq_len),
        }
    )
    return datasets.Dataset(table)
