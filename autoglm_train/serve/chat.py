"""``/v1/chat/completions``: messages → chat template (thinking switch) → generation → message or chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from autoglm_train.engine.engine import Delta, Engine, Prompt
from autoglm_train.engine.errors import EngineError
from autoglm_train.engine.sampling import SamplingParams, TokenLogprob
from autoglm_train.model.thinking import ThinkSplitter, prompt_opens_thinking, split_reasoning
from autoglm_train.serve.errors import APIError
from autoglm_train.serve.multimodal import parse_messages, part_slots
from autoglm_train.serve.prepare import bound_tokens, request_id, sampling_params
from autoglm_train.serve.schemas import ChatCompletionRequest
from autoglm_train.serve.state import ServerState
from autoglm_train.serve.worker import Producer


@dataclass
class ChatJob:
    """A validated, tokenized chat request ready to generate."""

    id: str
    prompt: Prompt
    params: list[SamplingParams]
    in_reasoning: bool
    """The rendered prompt already opened a think block."""
    return_reasoning: bool
    logprobs: bool
    include_usage: bool
    start: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))


def prepare_chat(state: ServerState, body: ChatCompletionRequest, start: float) -> ChatJob:
    """Parse content parts, render the template, tokenize, bound the lengths (blocking: run it off the loop)."""
    engine = state.engine
    if not engine.tokenizer.chat_template:
        raise APIError(
            400,
            "this model's tokenizer has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    parsed = parse_messages(body.messages, part_slots(engine.slots), engine.reserved, state.config.max_image_pixels)
    template_kwargs = dict(body.chat_template_kwargs or {})
    return_reasoning = bool(template_kwargs.pop("return_reasoning", False))
    if body.return_reasoning is not None:
        return_reasoning = body.return_reasoning
    if body.enable_thinking is not None:
        template_kwargs["enable_thinking"] = body.enable_thinking
    try:
        text = engine.render_chat(parsed.messages, template_kwargs, plugins=tuple(parsed.items))
    except (APIError, EngineError):
        raise
    except Exception as err:  # jinja errors raised by the template itself (e.g. role order)
        raise APIError(
            400, f"the chat template rejected these messages: {err}", param="messages", code="invalid_messages"
        ) from err
    ids = engine.encode(text, add_special_tokens=False)
    max_tokens = bound_tokens(state, len(ids), body.max_completion_tokens or body.max_tokens, "messages", "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    return ChatJob(
        id=request_id("chatcmpl"),
        prompt=Prompt(ids=ids, inputs=engine.modality_inputs(parsed.items), text=text),
        params=sampling_params(state, body, max_tokens, top),
        in_reasoning=prompt_opens_thinking(text),
        return_reasoning=return_reasoning,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        start=start,
    )


def _choices(engine: Engine, job: ChatJob) -> Producer:
    """The ``n`` choices, decoded together in the engine's running batch."""
    jobs = [(job.prompt, params) for params in job.params]
    return lambda emit, done, cancel: engine.submit_many(jobs, cancel, emit, done)


def logprobs_content(engine: Engine, records: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat-style logprobs: ``[{token, logprob, bytes, top_logprobs: [...]}]``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = engine.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]} for r in records]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def chat_completion(state: ServerState, job: ChatJob, model: str, disconnected) -> dict[str, Any]:
    """The whole ``chat.completion`` object (non-streaming)."""
    n = len(job.params)
    texts: list[list[str]] = [[] for _ in range(n)]
    records: list[list[TokenLogprob]] = [[] for _ in range(n)]
    counts, finish = [0] * n, ["length"] * n
    try:
        async for index, event in state.worker.iterate(_choices(state.engine, job), disconnected):
            if not isinstance(event, Delta):
                continue
            if event.token_ids and not any(counts):
                state.metrics.first_token(time.perf_counter() - job.start)
            texts[index].append(event.text)
            records[index] += event.logprobs
            counts[index] += len(event.token_ids)
            if event.finish_reason:
                finish[index] = event.finish_reason
    finally:
        state.metrics.add_tokens(len(job.prompt.ids), sum(counts))
    choices = []
    for index in range(n):
        reasoning, content = split_reasoning("".join(texts[index]), job.in_reasoning)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if job.return_reasoning:
            message["reasoning_content"] = reasoning or None
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": {"content": logprobs_content(state.engine, records[index])} if job.logprobs else None,
                "finish_reason": finish[index],
            }
        )
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": model,
        "choices": choices,
        "usage": usage(len(job.prompt.ids), sum(counts)),
    }


async def chat_chunks(state: ServerState, job: ChatJob, model: str) -> AsyncIterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: a role chunk, content/reasoning deltas, a finish chunk per choice."""

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": model,
            "choices": [choice],
        }

    splitters = [ThinkSplitter(job.in_reasoning) for _ in job.params]
    counts = [0] * len(job.params)
    started: set[int] = set()
    try:
        async for index, event in state.worker.iterate(_choices(state.engine, job)):
            if not isinstance(event, Delta):
                continue
            if index not in started:
                started.add(index)
                yield chunk(index, {"role": "assistant", "content": ""})
            if event.token_ids and not any(counts):
                state.metrics.first_token(time.perf_counter() - job.start)
            counts[index] += len(event.token_ids)
            reasoning, content = splitters[index].feed(event.text)
            if event.finish_reason:
                more_reasoning, more_content = splitters[index].flush()
                reasoning, content = reasoning + more_reasoning, content + more_content
            delta = {}
            if reasoning and job.return_reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            logprobs = (
                {"content": logprobs_content(state.engine, event.logprobs)} if job.logprobs and event.logprobs else None
            )
            if delta or logprobs:
                yield chunk(index, delta, logprobs=logprobs)
            if event.finish_reason:
                yield chunk(index, {}, finish=event.finish_reason)
    finally:
        state.metrics.add_tokens(len(job.prompt.ids), sum(counts))
    if job.include_usage:
        yield {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": model,
            "choices": [],
            "usage": usage(len(job.prompt.ids), sum(counts)),
        }
