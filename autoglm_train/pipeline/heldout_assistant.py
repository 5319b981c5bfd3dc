"""The held-out assistant data the server is judged on: chat prompts with teacher answers, verifiable questions.

``chat.jsonl``: per held-out chat prompt (:func:`~autoglm_train.data.prompt_sources.heldout_chat`, hand-written,
never in a training set), the ``prompt_ids`` the server renders for it thinking-off
(:func:`~autoglm_train.data.chat.prompt_ids` with the bundle's chat template), and the distill run's teacher's
answer **sampled at temperature 1, top_p 1** after the same messages rendered with the teacher's own chat template
(as training asks it, :meth:`~autoglm_train.data.assistant_datamodule.AssistantDataModule.teacher_prompts`;
:func:`~autoglm_train.distill.teacher_answers.teacher_answers`, cached on disk like the training answers): its
``answer_ids``, the teacher's log-probability of each (``teacher_logprobs``) and its most likely token at each
position (``teacher_top1``). Samples of the teacher itself are what make the client's mean log-ratio an unbiased
estimate of KL(teacher as it is used ‖ student as it is served) (:mod:`autoglm_train.eval.assistant`).

``verifiable.jsonl``: the first held-out verifiable questions (:func:`~autoglm_train.data.assistant_prompts.
heldout_verifiable`, round-robin over the families, each from its own fixed seed) with gold answer and family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_FILE = "chat.jsonl"
VERIFIABLE_FILE = "verifiable.jsonl"
ANSWER_CACHE = "teacher_answers"
"""Under the run's ``paths.cache_dir``: where the teacher-answer caches of all teachers and settings live."""


def chat_template(distill: Path, bundle: Path | None):
    """``(tokenizer, template)``: the distill run's student tokenizer, and the chat template the server renders
    with (the bundle's; without a bundle, the one the export would write)."""
    from transformers import AutoTokenizer

    from autoglm_train.model.chat_template import bundle_chat_template

    tokenizer = AutoTokenizer.from_pretrained(distill / "student")
    if bundle is None:
        return tokenizer, bundle_chat_template(tokenizer)
    from autoglm_train.engine.bundle import read_bundle

    served = AutoTokenizer.from_pretrained(read_bundle(bundle).decoder_dir)
    if not served.chat_template:
        raise ValueError(f"{bundle}: the bundle's tokenizer has no chat template; the server could not render chats")
    return tokenizer, served.chat_template


def _answer_spec(max_new_tokens: int):
    """Temperature 1, top_p 1 (samples of the teacher's own distribution), top-1 kept; a fixed seed."""
    from autoglm_train.distill.teacher_answers import AnswerSpec

    return AnswerSpec(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k_logprobs=1, seed=0)


def _teacher(distill: Path):
    """The distill run's teacher (loaded as training loads it), its fingerprint, KD vocabulary and cache root."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from autoglm_train.distill.teacher import TeacherSpec, load_teacher, load_teacher_tokenizer
    from autoglm_train.distill.teacher_answers import teacher_fingerprint
    from autoglm_train.eval.heldout_text import run_config

    config = run_config(distill)
    spec = instantiate(config.teacher)
    if not isinstance(spec, TeacherSpec):
        raise ValueError(
            f"{distill}: its teacher ({type(spec).__name__}) is not a local model; held-out teacher answers are "
            "generated in-process"
        )
    cache = OmegaConf.select(config, "paths.cache_dir") or str(Path(".cache"))
    own = load_teacher_tokenizer(spec)
    return load_teacher(spec), own, teacher_fingerprint(spec), len(own), Path(cache) / ANSWER_CACHE


def write_chat(distill: Path, bundle: Path | None, out: Path, count: int, max_new_tokens: int) -> dict[str, Any]:
    """``out/chat.jsonl`` for the first ``count`` held-out chat prompts; the teacher-answer stats."""
    from autoglm_train.data.chat import prompt_ids
    from autoglm_train.data.prompt_sources import heldout_chat
    from autoglm_train.distill.teacher_answers import teacher_answers

    tokenizer, template = chat_template(distill, bundle)
    conversations = [[{"role": "user", "content": p}] for p in heldout_chat()[:count]]
    served = [prompt_ids(tokenizer, template, m, enable_thinking=False) for m in conversations]
    teacher, own, teacher_id, kd_vocab, cache_root = _teacher(distill)
    asked = [prompt_ids(own, own.chat_template or template, m, enable_thinking=False) for m in conversations]
    answers, stats = teacher_answers(
        teacher, tokenizer, asked, _answer_spec(max_new_tokens), cache_root, teacher_id, kd_vocab
    )
    rows = [
        {
            "messages": messages,
            "prompt_ids": prompt,
            "answer_ids": answer.answer_ids,
            "teacher_logprobs": [float(v) for v in answer.token_logprobs],
            "teacher_top1": [int(v) for v in answer.topk_ids[:, 0]],
            "teacher_content": answer.content,
            "finished": bool(answer.finished),
        }
        for messages, prompt, answer in zip(conversations, served, answers, strict=True)
    ]
    _jsonl(out / CHAT_FILE, rows)
    return {**stats, "items": len(rows), "answer_tokens": sum(len(r["answer_ids"]) for r in rows)}


def write_verifiable(out: Path, count: int, distill: Path | None = None) -> int:
    """``out/verifiable.jsonl``: the first ``count`` held-out questions of the families the distill run trained on
    (``data.families``; every family without a run or a list), round-robin: the set that run never saw."""
    from omegaconf import OmegaConf

    from autoglm_train.data.assistant_prompts import heldout_verifiable
    from autoglm_train.data.verifiable.families import FAMILIES
    from autoglm_train.eval.heldout_text import run_config

    families = OmegaConf.select(run_config(distill), "data.families") if distill is not None else None
    rows = [
        {"messages": [{"role": "user", "content": item.question}], "answer": item.answer, "family": item.family}
        for item in heldout_verifiable(list(families or FAMILIES), count=count)
    ]
    _jsonl(out / VERIFIABLE_FILE, rows)
    return len(rows)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
