"""Teacher answers (sequence-level KD): the teacher writes the assistant turn of prompt-only rows, once.

The student should learn what the teacher *says* after a chat prompt, not only how it continues text. For each
prompt (token ids rendered with the bundle's chat template by the caller, :func:`~autoglm_train.data.chat.
prompt_ids`, so the teacher conditions on exactly the ids the student trains on and the server builds) the teacher
generates an answer (batched, KV cache, sampling settings from :class:`AnswerSpec`), and its per-token log-probs and
top-k are kept (from the raw logits, temperature 1, over the KD vocabulary): token-level KD then runs on those turns
from the cache, without running the teacher again, like the offline top-k cache (:mod:`.topk_cache`).

Answers are cached on disk (:mod:`.answer_cache`), keyed by the teacher's weights (:func:`teacher_fingerprint`),
the sampling settings, the KD vocabulary and the tokenizer; within the cache by prompt. A killed build keeps its
finished shards and the next call generates only the missing prompts; an unchanged call generates nothing. A batch
is seeded from ``spec.seed`` and its first prompt, and missing prompts are batched the same way every time, so a
resumed build draws what an uninterrupted one would have.

A teacher that thinks (``<think>…</think>answer``, any HF reasoning model) is split the way the server splits it
(:func:`~autoglm_train.model.thinking.split_reasoning`, the think block opened by the prompt when it is).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoglm_train.data.build import tokenizer_fingerprint
from autoglm_train.distill.answer_cache import (
    TeacherAnswer,
    answer_cache_dir,
    cached_keys,
    open_cache,
    prompt_key,
    read_shard,
    write_shard,
)
from autoglm_train.distill.teacher import TeacherSpec, teacher_dir
from autoglm_train.errors import ConfigValueError
from autoglm_train.model.pin import config_sha256, file_sha256, weights_sha256
from autoglm_train.model.prompt_format import end_of_turn_id
from autoglm_train.model.thinking import prompt_opens_thinking, split_reasoning

__all__ = ["AnswerSpec", "TeacherAnswer", "teacher_answers", "teacher_fingerprint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnswerSpec:
    """``recipe.teacher_answers``: how the teacher answers and how its answers are cached."""

    max_new_tokens: int = 64
    """Longest answer; a longer one is cut (``finished=False``)."""
    temperature: float = 0.7
    """Sampling temperature; 0 = greedy. The stored log-probs are at temperature 1 whatever this is."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k_logprobs: int = 32
    """Teacher log-probs kept per answer token, for KD."""
    batch_size: int = 16
    """Prompts per generate call (prompts of similar length are batched together)."""
    seed: int = 0
    """Sampling seed; each batch is seeded from it and the batch's first prompt."""
    shard_rows: int = 256
    """Answers per cache shard: the unit of resumption."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.top_k_logprobs < 1 or self.batch_size < 1 or self.shard_rows < 1:
            raise ConfigValueError(
                "recipe.teacher_answers: max_new_tokens, top_k_logprobs, batch_size and shard_rows must be >= 1"
            )
        if self.temperature < 0:
            raise ConfigValueError(f"recipe.teacher_answers.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigValueError(f"recipe.teacher_answers.top_p={self.top_p} must be in (0, 1]")

    def cache_fields(self) -> dict[str, Any]:
        """The fields that change what is generated (batching and sharding do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch_size", "shard_rows")}


def teacher_fingerprint(teacher: TeacherSpec | str | Path) -> str:
    """sha256 naming the teacher's weights: a new checkpoint, conversion or dtype gets new answers.

    Args:
        teacher: a :class:`TeacherSpec` (its dtype and int8 switch count too: they change the logits), a local HF
            model directory or ``.gguf`` file, or a hub id (its cached snapshot when there is one, else its name and
            revision).
    """
    parts: list[str] = []
    if isinstance(teacher, TeacherSpec):
        parts += [f"dtype={teacher.dtype}", f"int8={teacher.load_in_8bit}"]
        source = Path(teacher_dir(teacher)) if teacher.is_gguf or teacher.resolved_path() else None
        name, revision = teacher.path, teacher.revision
    else:
        source = Path(teacher).expanduser() if Path(teacher).expanduser().exists() else None
        name, revision = str(teacher), None
    if source is None:
        source = _hub_snapshot(name, revision)
    if source is None:
        parts.append(f"hub={name}@{revision or 'main'}")
    elif source.is_file():
        parts.append(f"file={file_sha256(source)}")
    else:
        parts += [f"config={config_sha256(source)}", f"weights={weights_sha256(source)}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The locally cached snapshot of a hub model, if any (its weights are then hashed like a directory's)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # not a repo id, or not downloaded: the name stands for the weights
        return None


def teacher_answers(
    teacher: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    spec: AnswerSpec,
    cache_root: Path,
    teacher_id: str,
    kd_vocab: int,
    log_every: int = 10,
    wait_s: float | None = None,
) -> tuple[list[TeacherAnswer], dict[str, Any]]:
    """The teacher's answer to every prompt, generated where the cache lacks it.

    Args:
        teacher: an HF causal LM (``generate``), frozen, in eval mode.
        tokenizer: the tokenizer the prompts were rendered with (the teacher's and the student's).
        prompts: token ids of rendered chat prompts (generation prompt included).
        spec: sampling and caching settings.
        cache_root: the directory the caches of all teachers/settings live under.
        teacher_id: names the teacher's weights (:func:`teacher_fingerprint`).
        kd_vocab: the ids KD compares; log-probs are normalised over them and answers drawn from them.
        log_every: batches between progress lines.
        wait_s: generate nothing: wait up to this long for another process (global rank 0 of a multi-rank run) to
            cache every answer, then read them; a TimeoutError names what is still missing.

    Returns:
        The answers in prompt order, and stats ``{"generated", "reused", "seconds", "new_tokens", "cache_dir",
        "finished_share"}``.
    """
    start = time.perf_counter()
    if spec.top_k_logprobs > kd_vocab:
        raise ConfigValueError(f"recipe.teacher_answers.top_k_logprobs={spec.top_k_logprobs} > kd_vocab={kd_vocab}")
    tok_fp = {k: v for k, v in tokenizer_fingerprint(tokenizer).items() if k != "name"}  # not where it was read
    identity = {"teacher": teacher_id, "spec": spec.cache_fields(), "kd_vocab": kd_vocab, "tokenizer": tok_fp}
    directory = answer_cache_dir(cache_root, identity)
    open_cache(directory, identity)
    prompts = [list(map(int, p)) for p in prompts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"teacher answers: prompts {empty[:10]} are empty (a rendered chat prompt has ids)")
    keys = [prompt_key(p) for p in prompts]
    where = cached_keys(directory)
    if wait_s is not None:
        where = _wait_for(directory, set(keys), where, wait_s)
    missing = {k: p for k, p in zip(keys, prompts, strict=True) if k not in where}
    reused = len(set(keys)) - len(missing)
    new_tokens = _generate_missing(teacher, tokenizer, list(missing.values()), spec, directory, kd_vocab, log_every)
    where = cached_keys(directory)
    answers: dict[str, TeacherAnswer] = {}
    for shard in sorted({where[k] for k in keys}):
        answers.update(read_shard(shard))
    ordered = [answers[k] for k in keys]
    stats = {
        "generated": len(missing),
        "reused": reused,
        "seconds": time.perf_counter() - start,
        "new_tokens": new_tokens,
        "cache_dir": str(directory),
        "finished_share": float(np.mean([a.finished for a in ordered])) if ordered else 1.0,
    }
    log.info(
        "teacher answers: %d generated, %d reused, %.1f s, %.0f%% finished (%s)",
        stats["generated"], reused, stats["seconds"], 100 * stats["finished_share"], directory,
    )  # fmt: skip
    return ordered, stats


def _wait_for(directory: Path, keys: set[str], where: dict[str, Path], wait_s: float) -> dict[str, Path]:
    """``cached_keys`` once every one of ``keys`` is there (polled every second), or a TimeoutError."""
    deadline = time.monotonic() + wait_s
    while not keys <= where.keys():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"teacher answers: {len(keys - where.keys())} of {len(keys)} answers still missing from {directory} "
                f"after {wait_s:.0f} s (global rank 0 writes them; is it alive?)"
            )
        time.sleep(1.0)
        where = cached_keys(directory)
    return where


def _generate_missing(
    teacher: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    spec: AnswerSpec,
    directory: Path,
    kd_vocab: int,
    every: int,
) -> int:
    """Generate and store answers to ``prompts`` shard by shard; returns the number of new tokens."""
    if not prompts:
        return 0
    # Sorted by length (then key, for a fixed order): less padding, and the same shards and batches on every resume.
    prompts = sorted(prompts, key=lambda p: (len(p), prompt_key(p)))
    total, done, tokens, start, batches = len(prompts), 0, 0, time.perf_counter(), 0
    for s in range(0, total, spec.shard_rows):
        shard: list[TeacherAnswer] = []
        for b in range(s, min(s + spec.shard_rows, total), spec.batch_size):
            batch = prompts[b : min(b + spec.batch_size, s + spec.shard_rows, total)]
            shard += generate_answers(teacher, tokenizer, batch, spec, kd_vocab)
            tokens += sum(len(a.answer_ids) for a in shard[-len(batch) :])
            done, batches = done + len(batch), batches + 1
            if batches % every == 0 or done == total:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                log.info("teacher answers: %d/%d prompts, %d tokens, %.1f tokens/s", done, total, tokens, rate)
        write_shard(directory, shard)
    return tokens


@torch.no_grad()
def generate_answers(
    teacher: nn.Module, tokenizer, prompts: list[list[int]], spec: AnswerSpec, kd_vocab: int
) -> list[TeacherAnswer]:
    """One batch: left-padded ``generate`` with a KV cache; log-probs from the raw logits of each step."""
    device = next(teacher.parameters()).device
    stops = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.as_tensor(p)
        mask[row, width - len(p) :] = 1
    vocab = teacher.get_output_embeddings().weight.shape[0]
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:{prompt_key(prompts[0])}".encode()).digest()[:8], "big")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed % 2**63)
        out = teacher.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=_generation_config(spec, stops, pad),
            logits_processor=[_KDVocabOnly(kd_vocab)] if vocab > kd_vocab else None,
        )
    new = out.sequences[:, width:].cpu()
    token_lp, top_ids, top_lp = [], [], []
    for j, step in enumerate(out.logits):  # one step at a time: a [batch, vocab] float32 copy, not [batch, n, vocab]
        lp = torch.log_softmax(step.float()[:, :kd_vocab], dim=-1)
        token_lp.append(lp.gather(-1, new[:, j : j + 1].clamp(max=kd_vocab - 1).to(lp.device)).squeeze(-1).cpu())
        top = lp.topk(spec.top_k_logprobs, dim=-1)
        top_ids.append(top.indices.cpu().to(torch.int32))
        top_lp.append(top.values.cpu())
    token_lps = torch.stack(token_lp, 1).numpy()
    topk_ids, topk_lps = torch.stack(top_ids, 1).numpy(), torch.stack(top_lp, 1).numpy()
    answers = []
    for row, prompt in enumerate(prompts):
        ids = new[row].tolist()
        end = next((j for j, t in enumerate(ids) if t in stops), None)
        n = len(ids) if end is None else end + 1
        reasoning, content = _split(tokenizer, prompt, ids[:n])
        answers.append(
            TeacherAnswer(
                prompt_ids=prompt,
                answer_ids=ids[:n],
                token_logprobs=token_lps[row, :n],
                topk_ids=topk_ids[row, :n],
                topk_logprobs=topk_lps[row, :n],
                finished=end is not None,
                reasoning=reasoning,
                content=content,
            )
        )
    return answers


class _KDVocabOnly:
    """A logits processor: the teacher's ids past the KD vocab are never drawn (the student could not write them)."""

    def __init__(self, kd_vocab: int) -> None:
        self.kd_vocab = kd_vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, torch.arange(self.kd_vocab, scores.shape[-1], device=scores.device), -torch.inf)


def _generation_config(spec: AnswerSpec, stops: list[int], pad: int):
    """Every sampling knob set explicitly, so a teacher's own ``generation_config.json`` adds nothing."""
    from transformers import GenerationConfig

    sample = spec.temperature > 0
    return GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        do_sample=sample,
        temperature=spec.temperature if sample else 1.0,
        top_p=spec.top_p if sample else 1.0,
        top_k=0 if sample else None,
        repetition_penalty=1.0,
        eos_token_id=stops,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
    )


def _split(tokenizer, prompt: list[int], answer: list[int]) -> tuple[str | None, str]:
    """``(reasoning, content)`` as the server returns them: decoded without special tokens, think block split off."""
    text = tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    tail = tokenizer.decode(prompt[-8:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    reasoning, content = split_reasoning(text, in_reasoning=prompt_opens_thinking(tail))
    return reasoning or None, content
