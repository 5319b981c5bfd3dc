"""``/v1/completions``: raw prompts (text or token ids, batched) → text, with legacy ``logprobs`` and ``echo``.

``echo=true, max_tokens=0, logprobs=k`` returns the log-probability of every prompt token,
which is what lm-evaluation-harness's ``local-completions`` model and perplexity evaluation use.
A distillation teacher is asked the way vLLM is (:mod:`autoglm_train.distill.teacher_client`): token ids in,
``echo`` + ``logprobs=k`` + ``max_tokens=1`` + ``return_tokens_as_token_ids`` (alternatives keyed ``token_id:N``),
or vLLM's ``prompt_logprobs`` field; ``k`` above ``--max-logprobs`` is refused with vLLM's wording.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from autoglm_train.engine.engine import Delta, Engine, Prompt, PromptScores
from autoglm_train.engine.sampling import SamplingParams, TokenLogprob
from autoglm_train.serve.chat import usage
from autoglm_train.serve.errors import APIError
from autoglm_train.serve.multimodal import check_reserved
from autoglm_train.serve.prepare import bound_tokens, request_id, sampling_params
from autoglm_train.serve.schemas import CompletionRequest
from autoglm_train.serve.state import ServerState
from autoglm_train.serve.worker import Producer


@dataclass
class CompletionJob:
    id: str
    prompts: list[Prompt]
    params: list[list[SamplingParams]]
    """Per prompt, one entry per choice."""
    echo: bool
    logprobs: int | None
    include_usage: bool
    prompt_logprobs: int | None = None
    """vLLM's ``prompt_logprobs`` field was asked for: answer it in each choice."""
    as_ids: bool = False
    """``return_tokens_as_token_ids``: tokens named ``token_id:N`` instead of their text."""
    start: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return len(self.params[0])


def prepare_completion(state: ServerState, body: CompletionRequest, start: float) -> CompletionJob:
    """Tokenize and bound every prompt (blocking: run it off the loop)."""
    engine = state.engine
    _check_logprobs(state, body)
    raw = body.prompt
    if isinstance(raw, str) or isinstance(raw[0], int):
        raw = [raw]  # one prompt: text or token ids
    if len(raw) > state.config.max_batch_prompts:
        raise APIError(
            400,
            f"{len(raw)} prompts in one request; the limit is {state.config.max_batch_prompts}",
            param="prompt",
            code="invalid_value",
        )
    prompts, params = [], []
    for i, item in enumerate(raw):
        where = "prompt" if len(raw) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            check_reserved(item, engine.reserved, where)
            ids, text = engine.encode(item), item
        else:
            bad = [t for t in item if not 0 <= t < engine.vocab_limit]
            if bad:
                raise APIError(
                    400,
                    f"token ids {bad[:5]} are outside this model's vocabulary (0..{engine.vocab_limit - 1})",
                    param=where,
                    code="invalid_value",
                )
            ids, text = list(item), engine.tokenizer.decode(item, clean_up_tokenization_spaces=False)
        max_tokens = bound_tokens(state, len(ids), body.max_tokens, where, "prompt")
        prompt_logprobs = body.prompt_logprobs
        if prompt_logprobs is None and body.echo:
            prompt_logprobs = body.logprobs
        prompts.append(Prompt(ids=ids, text=text))
        params.append(sampling_params(state, body, max_tokens, body.logprobs, prompt_logprobs))
    return CompletionJob(
        id=request_id("cmpl"),
        prompts=prompts,
        params=params,
        echo=body.echo,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prompt_logprobs=body.prompt_logprobs,
        as_ids=body.return_tokens_as_token_ids,
        start=start,
    )


def _check_logprobs(state: ServerState, body: CompletionRequest) -> None:
    """``logprobs`` / ``prompt_logprobs`` up to ``--max-logprobs``; above it a 400 worded as vLLM's, which a teacher
    client recognises."""
    cap = state.config.max_logprobs
    for param, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        value = getattr(body, param)
        if value is not None and value > cap:
            raise APIError(
                400,
                f"Requested {kind} logprobs of {value}, which is greater than max allowed: {cap}",
                param=param,
                code="invalid_value",
            )


def _choices(engine: Engine, job: CompletionJob) -> Producer:
    """Every prompt's ``n`` choices (index ``prompt * n + choice``), decoded together as one batch."""
    jobs = [(prompt, params) for prompt, choices in zip(job.prompts, job.params, strict=True) for params in choices]
    return lambda emit, done, cancel: engine.submit_many(jobs, cancel, emit, done)


class LegacyLogprobs:
    """The completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, engine: Engine, offset: int, as_ids: bool = False) -> None:
        self.engine = engine
        self.offset = offset
        self.as_ids = as_ids
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, record: TokenLogprob | None) -> None:
        text = token_name(self.engine, token_id, self.as_ids)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        self.token_logprobs.append(None if record is None else record.logprob)
        top = None if record is None else {token_name(self.engine, t, self.as_ids): lp for t, lp in record.top}
        self.top_logprobs.append(top)

    def add_prompt(self, prompt: Prompt, scores: PromptScores) -> None:
        for token_id, record in zip(prompt.ids, scores.logprobs, strict=True):
            self.add(token_id, record)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }

    def take(self) -> dict[str, Any]:
        """The entries added since the last call (stream chunks), then start afresh."""
        out = self.to_dict()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def token_name(engine: Engine, token_id: int, as_id: bool) -> str:
    """A token as ``logprobs`` names it: its text, or ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``)."""
    return f"token_id:{token_id}" if as_id else engine.token_text(token_id)


def prompt_logprobs_field(engine: Engine, prompt: Prompt, scores: PromptScores, as_ids: bool) -> list[Any]:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or ``{"id": {logprob, rank, decoded_token}}``
    for the top alternatives, plus the prompt's own token (rank null when it is outside them)."""
    out: list[Any] = []
    for token_id, record in zip(prompt.ids, scores.logprobs, strict=True):
        if record is None:
            out.append(None)
            continue
        entry = {
            str(t): {"logprob": lp, "rank": rank, "decoded_token": token_name(engine, t, as_ids)}
            for rank, (t, lp) in enumerate(record.top, 1)
        }
        entry.setdefault(
            str(token_id),
            {"logprob": record.logprob, "rank": None, "decoded_token": token_name(engine, token_id, as_ids)},
        )
        out.append(entry)
    return out


def _logs(engine: Engine, job: CompletionJob, total: int) -> list[LegacyLogprobs]:
    """One ``logprobs`` object per choice; without ``echo`` its text offsets start after the prompt."""
    return [
        LegacyLogprobs(engine, 0 if job.echo else len(job.prompts[i // job.n].text or ""), job.as_ids)
        for i in range(total)
    ]


async def completion(state: ServerState, job: CompletionJob, model: str, disconnected) -> dict[str, Any]:
    """The whole ``text_completion`` object (non-streaming)."""
    total = len(job.prompts) * job.n
    texts: list[list[str]] = [[] for _ in range(total)]
    finish = ["length"] * total
    counts = [0] * total
    logs = _logs(state.engine, job, total)
    scored: dict[int, PromptScores] = {}
    try:
        async for index, event in state.worker.iterate(_choices(state.engine, job), disconnected):
            prompt = job.prompts[index // job.n]
            if isinstance(event, PromptScores):
                scored[index] = event
                if job.echo:
                    logs[index].add_prompt(prompt, event)
                continue
            if event.token_ids and not any(counts):
                state.metrics.first_token(time.perf_counter() - job.start)
            texts[index].append(event.text)
            counts[index] += len(event.token_ids)
            for record in event.logprobs:
                logs[index].add(record.token_id, record)
            if event.finish_reason:
                finish[index] = event.finish_reason
    finally:
        state.metrics.add_tokens(sum(len(p.ids) for p in job.prompts), sum(counts))
    choices = []
    for index in range(total):
        prompt = job.prompts[index // job.n]
        text = "".join(texts[index])
        choice = {
            "index": index,
            "text": (prompt.text or "") + text if job.echo else text,
            "logprobs": logs[index].to_dict() if job.logprobs is not None else None,
            "finish_reason": finish[index],
        }
        if job.prompt_logprobs is not None and index in scored:
            choice["prompt_logprobs"] = prompt_logprobs_field(state.engine, prompt, scored[index], job.as_ids)
        choices.append(choice)
    return {
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": model,
        "choices": choices,
        "usage": usage(sum(len(p.ids) for p in job.prompts), sum(counts)),
    }


async def completion_chunks(state: ServerState, job: CompletionJob, model: str) -> AsyncIterator[dict[str, Any]]:
    """``text_completion`` chunks; with ``echo`` each choice starts with its prompt."""

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": model, "choices": [choice]}

    total = len(job.prompts) * job.n
    counts = [0] * total
    started: set[int] = set()
    logs = _logs(state.engine, job, total)
    want = job.logprobs is not None
    try:
        async for index, event in state.worker.iterate(_choices(state.engine, job)):
            prompt = job.prompts[index // job.n]
            if isinstance(event, PromptScores) and job.echo:
                logs[index].add_prompt(prompt, event)
            if index not in started:
                started.add(index)
                if job.echo:
                    yield chunk(index, prompt.text or "", logs[index].take() if want else None)
            if not isinstance(event, Delta):
                continue
            if event.token_ids and not any(counts):
                state.metrics.first_token(time.perf_counter() - job.start)
            counts[index] += len(event.token_ids)
            for record in event.logprobs:
                logs[index].add(record.token_id, record)
            if event.text or (want and event.logprobs):
                yield chunk(index, event.text, logs[index].take() if want else None)
            if event.finish_reason:
                yield chunk(index, "", None, event.finish_reason)
    finally:
        state.metrics.add_tokens(sum(len(p.ids) for p in job.prompts), sum(counts))
    if job.include_usage:
        yield {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": model,
            "choices": [],
            "usage": usage(sum(len(p.ids) for p in job.prompts), sum(counts)),
        }
