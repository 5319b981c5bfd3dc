"""The on-disk cache of teacher answers: the one owner of its format (sequence-level KD without the teacher).

A cache directory holds one teacher's answers under one set of sampling settings (its name is their hash, see
:func:`answer_cache_dir`; ``meta.json`` spells them out). Answers are stored in shards, each a directory
``shard-<hash of its prompt keys>/`` with

* ``answers.safetensors``: the prompts' and answers' ids concatenated, with offsets, the answer tokens' log-probs,
  their top-k ids and log-probs and the ``finished`` flags (arrays only: safetensors, never pickle);
* ``index.json``: the prompt keys (sha256 of the prompt ids, :func:`prompt_key`) in row order, and the decoded
  reasoning/content of each answer (readable without loading the arrays).

A shard is written into a temporary directory and renamed into place whole (as :mod:`.topk_cache` does), so a
killed build leaves only finished shards, plus a dot-named temporary directory that readers ignore and the next
build of that shard replaces. Shards are found by listing, named by their contents: two builds that add answers
to one cache never collide on a name, and the answers are looked up by prompt, not by position.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
META_FILE = "meta.json"
ARRAYS_FILE = "answers.safetensors"
INDEX_FILE = "index.json"
_ARRAY_DTYPES = {
    "prompt_ids": np.int32,
    "prompt_offsets": np.int64,
    "answer_ids": np.int32,
    "answer_offsets": np.int64,
    "token_logprobs": np.float32,
    "topk_ids": np.int32,
    "topk_logprobs": np.float32,
    "finished": np.bool_,
}


@dataclass
class TeacherAnswer:
    """One assistant turn the teacher wrote, with what token-level KD needs of it."""

    prompt_ids: list[int]
    answer_ids: list[int]
    """As generated; ends with the end-of-turn id (or EOS) when ``finished``."""
    token_logprobs: np.ndarray
    """[n] float32: the teacher's log p(answer_ids[j] | prompt, answer[:j]) at temperature 1, over the KD vocab."""
    topk_ids: np.ndarray
    """[n, k] int32, most likely first."""
    topk_logprobs: np.ndarray
    """[n, k] float32: log-softmax at temperature 1 over the first ``kd_vocab`` ids."""
    finished: bool
    """False when cut at ``max_new_tokens``."""
    reasoning: str | None
    """The think block's text (the server's splitter), None when the teacher did not think."""
    content: str


def prompt_key(prompt_ids: list[int]) -> str:
    """What the cache looks an answer up by: sha256 of the prompt's token ids."""
    return hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()


def answer_cache_dir(root: str | Path, identity: dict[str, Any]) -> Path:
    """The cache directory of ``identity`` (teacher, sampling settings, KD vocab, tokenizer) under ``root``."""
    blob = json.dumps({"format": FORMAT, **identity}, sort_keys=True)
    return Path(root) / f"answers-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def open_cache(directory: Path, identity: dict[str, Any]) -> None:
    """Create ``directory`` with its ``meta.json``, or check that an existing one caches the same ``identity``."""
    meta = {"format": FORMAT, **identity}
    path = directory / META_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != json.loads(json.dumps(meta)):
            raise ValueError(f"{path}: this answer cache was written for {recorded}, not {meta}; refusing to mix them")
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


def cached_keys(directory: Path) -> dict[str, Path]:
    """Prompt key → the shard holding its answer, for every finished shard (temporary directories are skipped)."""
    where: dict[str, Path] = {}
    for shard in sorted(directory.glob("shard-*")):
        for key in _read_index(shard)["keys"]:
            where[key] = shard
    return where


def read_shard(shard: Path) -> dict[str, TeacherAnswer]:
    """Prompt key → answer, for one shard; a damaged shard is an error naming its file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = _read_index(shard)
    path = shard / ARRAYS_FILE
    try:
        arrays = load_file(path)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: unreadable teacher answer shard ({err}); delete {shard} to rebuild it") from err
    _check_shard(path, arrays, len(index["keys"]))
    p_off, a_off = arrays["prompt_offsets"], arrays["answer_offsets"]
    answers = {}
    for row, key in enumerate(index["keys"]):
        a, b = int(a_off[row]), int(a_off[row + 1])
        answers[key] = TeacherAnswer(
            prompt_ids=arrays["prompt_ids"][p_off[row] : p_off[row + 1]].tolist(),
            answer_ids=arrays["answer_ids"][a:b].tolist(),
            token_logprobs=arrays["token_logprobs"][a:b],
            topk_ids=arrays["topk_ids"][a:b],
            topk_logprobs=arrays["topk_logprobs"][a:b],
            finished=bool(arrays["finished"][row]),
            reasoning=index["reasoning"][row],
            content=index["content"][row],
        )
    return answers


def write_shard(directory: Path, answers: list[TeacherAnswer]) -> Path:
    """Store ``answers`` as one shard, renamed into place when complete; returns the shard's directory."""
    from safetensors.numpy import save_file

    keys = [prompt_key(a.prompt_ids) for a in answers]
    name = f"shard-{hashlib.sha256(''.join(keys).encode()).hexdigest()[:16]}"
    target, tmp = directory / name, directory / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed build's half-written copy of this very shard
    tmp.mkdir()
    k = answers[0].topk_ids.shape[1]
    arrays = {
        "prompt_ids": np.concatenate([np.asarray(a.prompt_ids) for a in answers]),
        "prompt_offsets": np.cumsum([0] + [len(a.prompt_ids) for a in answers]),
        "answer_ids": np.concatenate([np.asarray(a.answer_ids) for a in answers]),
        "answer_offsets": np.cumsum([0] + [len(a.answer_ids) for a in answers]),
        "token_logprobs": np.concatenate([a.token_logprobs for a in answers]),
        "topk_ids": np.concatenate([a.topk_ids.reshape(-1, k) for a in answers]),
        "topk_logprobs": np.concatenate([a.topk_logprobs.reshape(-1, k) for a in answers]),
        "finished": np.asarray([a.finished for a in answers]),
    }
    save_file({n: np.ascontiguousarray(v, dtype=_ARRAY_DTYPES[n]) for n, v in arrays.items()}, tmp / ARRAYS_FILE)
    index = {"keys": keys, "reasoning": [a.reasoning for a in answers], "content": [a.content for a in answers]}
    (tmp / INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False))
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / INDEX_FILE).is_file():  # not "another build wrote the same shard first"
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_index(shard: Path) -> dict[str, Any]:
    path = shard / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable teacher answer index ({err}); delete {shard} to rebuild it") from err
    n = len(index.get("keys", []))
    if any(len(index.get(field, [])) != n for field in ("reasoning", "content")):
        raise ValueError(f"{path}: 'keys', 'reasoning' and 'content' differ in length; delete {shard} to rebuild it")
    return index


def _check_shard(path: Path, arrays: dict[str, np.ndarray], rows: int) -> None:
    """The arrays agree with each other and with the index's row count."""
    missing = sorted(set(_ARRAY_DTYPES) - set(arrays))
    if missing:
        raise ValueError(f"{path}: teacher answer shard lacks {missing}")
    tokens = len(arrays["answer_ids"])
    expect = {
        "prompt_offsets": (rows + 1,),
        "answer_offsets": (rows + 1,),
        "finished": (rows,),
        "token_logprobs": (tokens,),
        "prompt_ids": (int(arrays["prompt_offsets"][-1]),),
    }
    expect["answer_ids"] = (int(arrays["answer_offsets"][-1]),)
    for name, shape in expect.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{path}: '{name}' has shape {arrays[name].shape}, expected {shape} ({rows} rows)")
    for name in ("topk_ids", "topk_logprobs"):
        if arrays[name].ndim != 2 or len(arrays[name]) != tokens:
            raise ValueError(f"{path}: '{name}' has shape {arrays[name].shape}, expected ({tokens}, k)")
