"""``/v1/completions``: raw prompts (text or token ids, batched) → text, with legacy ``logprobs`` and ``echo``.

``echo=true, max_tokens=0, logprobs=k`` returns the log-probability of every prompt token,
which is what lm-evaluation-harness's ``local-completions`` model and perplexity evaluation use.
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
    start: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return len(self.params[0])


def prepare_completion(state: ServerState, body: CompletionRequest, start: float) -> CompletionJob:
    """Tokenize and bound every prompt (blocking: run it off the loop)."""
    engine = state.engine
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
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        prompts.append(Prompt(ids=ids, text=text))
        params.append(sampling_params(state, body, max_tokens, body.logprobs, prompt_logprobs))
    return CompletionJob(
        id=request_id("cmpl"),
        prompts=prompts,
        params=params,
        echo=body.echo,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        start=start,
    )


def _choices(engine: Engine, job: CompletionJob) -> Producer:
    """Every prompt's ``n`` choices (index ``prompt * n + choice``), decoded together as one batch."""
    jobs = [(prompt, params) for prompt, choices in zip(job.prompts, job.params, strict=True) for params in choices]
    return lambda emit, done, cancel: engine.submit_many(jobs, cancel, emit, done)


class LegacyLogprobs:
    """The completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, engine: Engine, offset: int) -> None:
        self.engine = engine
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, record: TokenLogprob | None) -> None:
        text = self.engine.token_text(token_id)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        self.token_logprobs.append(None if record is None else record.logprob)
        top = None if record is None else {self.engine.token_text(t): lp for t, lp in record.top}
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


async def completion(state: ServerState, job: CompletionJob, model: str, disconnected) -> dict[str, Any]:
    """The whole ``text_completion`` object (non-streaming)."""
    total = len(job.prompts) * job.n
    texts: list[list[str]] = [[] for _ in range(total)]
    finish = ["length"] * total
    counts = [0] * total
    logs = [
        LegacyLogprobs(state.engine, 0 if job.echo else len(job.prompts[i // job.n].text or "")) for i in range(total)
    ]
    try:
        async for index, event in state.worker.iterate(_choices(state.engine, job), disconnected):
            prompt = job.prompts[index // job.n]
            if isinstance(event, PromptScores):
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
        choices.append(
            {
                "index": index,
                "text": (prompt.text or "") + text if job.echo else text,
                "logprobs": logs[index].to_dict() if job.logprobs is not None else None,
                "finish_reason": finish[index],
            }
        )
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
    logs = [
        LegacyLogprobs(state.engine, 0 if job.echo else len(job.prompts[i // job.n].text or "")) for i in range(total)
    ]
    want = job.logprobs is not None
    try:
        async for index, event in state.worker.iterate(_choices(state.engine, job)):
            prompt = job.prompts[index // job.n]
            if isinstance(event, PromptScores):
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
