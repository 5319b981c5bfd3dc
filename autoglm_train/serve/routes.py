"""The HTTP routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``, ``/metrics``.

Handlers stay thin: check, prepare off the event loop (decoding media and tokenizing are
blocking), then hand generation to the worker (admission, relay to the event loop). Authentication,
rate limits and the body limit are not here: ``security.Guard`` applies them to every ``/v1`` path before routing.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from autoglm_train.serve.chat import chat_chunks, chat_completion, prepare_chat
from autoglm_train.serve.completions import completion, completion_chunks, prepare_completion
from autoglm_train.serve.metrics import CONTENT_TYPE
from autoglm_train.serve.multimodal import part_type
from autoglm_train.serve.prepare import check_common, check_model
from autoglm_train.serve.schemas import ChatCompletionRequest, CompletionRequest
from autoglm_train.serve.state import ServerState, get_state
from autoglm_train.serve.streaming import sse_response

v1 = APIRouter(prefix="/v1")
ops = APIRouter()


def _model_card(state: ServerState) -> dict[str, Any]:
    engine = state.engine
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "autoglm-train",
        "max_model_len": state.max_model_len,
        "modalities": ["text", *(part_type(modality) for modality in engine.slots)],
        "thinking": engine.thinking,
    }


@v1.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(get_state(request))]}


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    check_model(state, model_id)
    return _model_card(state)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    start = time.perf_counter()
    state = get_state(request)
    check_model(state, body.model)
    check_common(state, body)
    job = await run_in_threadpool(prepare_chat, state, body, start)
    if body.stream:
        return sse_response(chat_chunks(state, job, body.model))
    return JSONResponse(await chat_completion(state, job, body.model, request.is_disconnected))


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    start = time.perf_counter()
    state = get_state(request)
    check_model(state, body.model)
    check_common(state, body)
    job = await run_in_threadpool(prepare_completion, state, body, start)
    if body.stream:
        return sse_response(completion_chunks(state, job, body.model))
    return JSONResponse(await completion(state, job, body.model, request.is_disconnected))


@ops.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = get_state(request)
    return {"status": "ok", "model": state.model_name, "modules": state.engine.loaded_modules()}


@ops.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(get_state(request).metrics.render(), media_type=CONTENT_TYPE)
