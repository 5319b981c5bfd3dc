"""Request checks shared by both endpoints: model name, refused features, token bounds, sampling settings."""

from __future__ import annotations

import uuid

from autoglm_train.engine.sampling import SamplingParams
from autoglm_train.serve.errors import APIError
from autoglm_train.serve.schemas import ChatCompletionRequest, CompletionRequest
from autoglm_train.serve.state import ServerState


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def check_common(state: ServerState, body: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse what cannot be honoured (instead of silently ignoring it)."""
    cfg = state.config
    if body.n > cfg.max_n:
        raise APIError(400, f"n={body.n} is over this server's limit of {cfg.max_n}", param="n", code="invalid_value")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise APIError(
                400,
                "tools / function calling are not supported by this server",
                param="tools",
                code="unsupported_parameter",
            )
        kind = (body.response_format or {}).get("type", "text")
        if kind != "text":
            raise APIError(
                400,
                f"response_format type {kind!r} is not supported (only 'text')",
                param="response_format",
                code="unsupported_parameter",
            )
    else:
        if body.suffix:
            raise APIError(
                400, "suffix (insertion) is not supported by this server", param="suffix", code="unsupported_parameter"
            )
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")


def bound_tokens(state: ServerState, prompt_tokens: int, max_tokens: int | None, param: str, where: str) -> int:
    """The completion budget; 400 ``context_length_exceeded`` when prompt + completion do not fit."""
    limit = state.max_model_len
    cap = state.config.max_tokens_cap
    if max_tokens is not None and max_tokens > cap:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is over this server's limit of {cap}",
            param="max_tokens",
            code="invalid_value",
        )
    if prompt_tokens == 0:
        raise APIError(400, f"the {where} is empty (0 tokens)", param=param, code="invalid_value")
    if max_tokens is None:
        max_tokens = max(0, min(state.config.default_max_tokens, cap, limit - prompt_tokens))
        too_long = max_tokens == 0
    else:
        too_long = prompt_tokens + max_tokens > limit
    if too_long or prompt_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but you requested {prompt_tokens + max_tokens} "
            f"tokens ({prompt_tokens} in the {where}, {max_tokens} for the completion); "
            f"shorten the {where} or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    state: ServerState,
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> list[SamplingParams]:
    """One :class:`SamplingParams` per choice (``seed + i`` for choice ``i``, so choices differ but repeat)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < state.engine.vocab_limit:
            raise APIError(
                400, f"logit_bias: {key!r} is not a token id of this model", param="logit_bias", code="invalid_value"
            )
        bias[int(key)] = value
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=None if body.seed is None else body.seed + i,
            stop=stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=bias,
        )
        for i in range(body.n)
    ]
