"""Offline teacher top-k: run the teacher over the training blocks once, distill without it.

Per token we keep the teacher's ``k`` largest log-probs (float16) and their ids (uint16
when the vocabulary fits, else int32): at k=32 that is 128 bytes/token for a <65,536-token
vocabulary, 192 otherwise. Written shard by shard (each one renamed into place when
complete), so a killed build resumes where it stopped. One writer for every teacher: the model in this process
(:func:`model_scorer`) or a teacher behind an OpenAI-compatible server (:mod:`.teacher_client`) only supply a
:data:`Scorer`; the shards, their order and ``meta.json`` (which names the teacher) are written here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT = 1


@dataclass
class TopKCacheSpec:
    """``recipe.teacher_cache`` in the distill recipe."""

    enabled: bool = False
    k: int = 32
    shard_blocks: int = 256
    """Blocks per shard: the unit of resumption."""
    batch_size: int = 8
    """Teacher forward batch size while building."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"recipe.teacher_cache.k={self.k} must be >= 1")
        if self.shard_blocks < 1 or self.batch_size < 1:
            raise ValueError("recipe.teacher_cache.shard_blocks and batch_size must be >= 1")


def cache_dir_for(root: str | Path, teacher_id: str, data_fingerprint: str, k: int, vocab: int) -> Path:
    """One cache per (teacher, packed data, k, compared vocab)."""
    key = hashlib.sha256(f"{FORMAT}:{teacher_id}:{data_fingerprint}:{k}:{vocab}".encode()).hexdigest()[:16]
    return Path(root) / f"topk-k{k}-{key}"


def bytes_per_token(k: int, vocab: int) -> int:
    return k * (2 + (2 if vocab <= np.iinfo(np.uint16).max + 1 else 4))


Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``input_ids [n, T]`` → (top-k ids [n, T, k], their log-probs [n, T, k]): position t holds the teacher's top-k
over the token after t, given tokens ≤ t (the logits at t, as the loss reads them against ``labels[t]``)."""


def build_topk_cache(
    teacher: nn.Module, train, directory: str | Path, spec: TopKCacheSpec, vocab_size: int, teacher_id: str = ""
):
    """Teacher top-k log-probs for every block of ``train``; returns the cache as a ``datasets.Dataset``.

    Shards already on disk are kept (resume); the finished cache is reused as is.
    """
    return write_topk_cache(model_scorer(teacher, spec, vocab_size), train, directory, spec, vocab_size, teacher_id)


def model_scorer(teacher: nn.Module, spec: TopKCacheSpec, vocab_size: int) -> Scorer:
    """The in-process teacher as a :data:`Scorer`: ``spec.batch_size`` blocks per forward, log_softmax in float32
    over the first ``vocab_size`` columns."""
    backbone = getattr(teacher, teacher.base_model_prefix)
    head = teacher.get_output_embeddings()
    device = next(teacher.parameters()).device

    @torch.no_grad()
    def score(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, logprobs = [], []
        for s in range(0, len(blocks), spec.batch_size):
            input_ids = torch.as_tensor(blocks[s : s + spec.batch_size])
            hidden = backbone(input_ids=input_ids.to(device)).last_hidden_state
            logits = head(hidden).float()[..., :vocab_size]
            top = torch.log_softmax(logits, dim=-1).topk(spec.k, dim=-1)
            ids.append(top.indices.cpu().numpy())
            logprobs.append(top.values.cpu().numpy())
        return np.concatenate(ids), np.concatenate(logprobs)

    return score


def write_topk_cache(score: Scorer, train, directory: str | Path, spec: TopKCacheSpec, vocab_size: int, teacher_id=""):
    """The one writer of the cache format: ``score`` each shard's blocks, store, rename the shard into place.

    Any teacher goes through here (in process, or a server: :mod:`.teacher_client`), so a build killed anywhere
    — or a teacher server that dies — resumes at the first missing shard. ``teacher_id`` names the teacher in
    ``meta.json``; a finished cache of another teacher in ``directory`` is refused, never reused.
    """
    import datasets

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_same_teacher(directory, teacher_id)
    n = len(train)
    shards = [(start, min(start + spec.shard_blocks, n)) for start in range(0, n, spec.shard_blocks)]
    id_dtype = "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"
    seq_len = len(train[0]["input_ids"])
    features = datasets.Features(
        {
            "topk_ids": datasets.Array2D((seq_len, spec.k), id_dtype),
            "topk_logprobs": datasets.Array2D((seq_len, spec.k), "float16"),
        }
    )
    done = 0
    for index, (start, stop) in enumerate(shards):
        target = directory / f"shard-{index:05d}"
        if target.is_dir():
            done += 1
            continue
        ids, logprobs = score(np.asarray(train[start:stop]["input_ids"]))
        _check_scores(ids, logprobs, (stop - start, seq_len, spec.k), vocab_size, start)
        shard = datasets.Dataset.from_dict(
            {"topk_ids": ids.astype(id_dtype), "topk_logprobs": logprobs.astype(np.float16)}, features=features
        )
        tmp = directory / f".shard-{index:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shard.save_to_disk(str(tmp))
        os.replace(tmp, target)
        log.info("teacher top-k cache: shard %d/%d (%d blocks) written", index + 1, len(shards), stop - start)
    if done:
        log.info("teacher top-k cache: %d of %d shards reused from %s", done, len(shards), directory)
    meta = {
        "format": FORMAT,
        "teacher": teacher_id,
        "k": spec.k,
        "blocks": n,
        "shards": len(shards),
        "id_dtype": id_dtype,
        "bytes_per_token": bytes_per_token(spec.k, vocab_size),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return load_topk_cache(directory)


def _check_same_teacher(directory: Path, teacher_id: str) -> None:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return
    recorded = json.loads(meta_path.read_text()).get("teacher", "")
    if recorded and teacher_id and recorded != teacher_id:
        raise ValueError(f"{directory}: top-k cache of teacher {recorded!r}, not {teacher_id!r}; refusing to reuse it")


def _check_scores(ids: np.ndarray, logprobs: np.ndarray, shape: tuple, vocab_size: int, first_block: int) -> None:
    """A scorer's answer must be [blocks, T, k] and name ids the KD loss compares (< ``vocab_size``)."""
    if ids.shape != shape or logprobs.shape != shape:
        raise ValueError(f"teacher top-k of shape {ids.shape} / {logprobs.shape}; expected {shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        where = np.argwhere((ids < 0) | (ids >= vocab_size))[0]
        raise ValueError(
            f"teacher top-k of block {first_block + int(where[0])} names token id {int(ids[tuple(where)])}, outside "
            f"the {vocab_size} ids the KD loss compares (a teacher with a larger vocabulary than the student's?)"
        )


def wait_for_topk_cache(directory: str | Path, stall_timeout_s: float, poll_s: float = 1.0):
    """The cache another process (global rank 0) is writing into ``directory``, once it is complete.

    Every rank of a multi-process run needs the cache, one of them writes it: the others wait here as long as
    shards keep appearing, so a teacher that takes hours is waited for. ``stall_timeout_s`` without a new shard is
    an error: the writer died, or this rank does not see its filesystem.
    """
    directory = Path(directory)
    shards, since = -1, time.monotonic()
    while not (directory / META_FILE).is_file():
        count = len(list(directory.glob("shard-*"))) if directory.is_dir() else 0
        if count != shards:
            shards, since = count, time.monotonic()
        elif time.monotonic() - since > stall_timeout_s:
            raise TimeoutError(
                f"{directory}: no new teacher top-k shard for {stall_timeout_s:g} s while waiting for global rank 0 "
                "to write the cache (did it fail? is this directory on a filesystem every rank shares?)"
            )
        time.sleep(poll_s)
    return load_topk_cache(directory)


def load_topk_cache(directory: str | Path):
    """The finished cache as one ``datasets.Dataset`` (memory-mapped shards, in order)."""
    import datasets

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: teacher top-k cache is incomplete (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    parts = [datasets.load_from_disk(str(directory / f"shard-{i:05d}")) for i in range(meta["shards"])]
    cache = datasets.concatenate_datasets(parts)
    if len(cache) != meta["blocks"]:
        raise ValueError(f"{directory}: cache has {len(cache)} blocks, meta.json says {meta['blocks']}")
    return cache


def disk_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*.arrow"))
