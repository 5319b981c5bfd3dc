"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, for every failure path.

The one place where failures get HTTP status codes: the server's own refusals are :class:`APIError`
(status included), and the engine's exceptions, which know nothing of HTTP, are mapped by
:data:`ENGINE_STATUS`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from autoglm_train.engine.errors import EngineError, InvalidRequest, PluginUnavailable

__all__ = ["ENGINE_STATUS", "APIError", "api_error", "error_body", "error_response", "install_error_handlers"]

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see as it is.

    Args:
        status: HTTP status.
        message: what went wrong and, where possible, what to do instead.
        param: the request field at fault (``messages[0].content[1].image_url.url``).
        code: a stable machine-readable code (``context_length_exceeded``, ``invalid_api_key``).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


ENGINE_STATUS: dict[type[EngineError], int] = {
    InvalidRequest: 400,  # the client's request is at fault (media a plugin cannot take, mixed prompt formats)
    PluginUnavailable: 503,  # a plugin failed to load on this server: not the client's fault, retry may help
}
"""Engine exception → HTTP status; an :class:`EngineError` not listed (a new kind) is a 500."""


def api_error(err: EngineError) -> APIError:
    """The response an engine exception becomes: its status from :data:`ENGINE_STATUS`, its message and code."""
    status = next((s for kind, s in ENGINE_STATUS.items() if isinstance(err, kind)), 500)
    return APIError(status, err.message, param=err.param, code=err.code)


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers)


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """The JSON body for middleware that answers before FastAPI runs."""
    return json.dumps(error_body(status, message, param, code)).encode()


def install_error_handlers(app: FastAPI) -> None:
    """Route every error (ours, FastAPI's validation, Starlette's 404/405, crashes) into the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, err: EngineError) -> JSONResponse:
        return error_response(api_error(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response(
                APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
            )
        param = _param(first.get("loc", ()))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        message = f"{param or 'body'}: {first.get('msg')}{more}"
        return error_response(APIError(422, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code)
        return error_response(APIError(err.status_code, str(err.detail), code=code, headers=err.headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(err).__name__})", code="internal_error"))


_UNION_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple | list) -> str | None:
    """FastAPI's error location ``("body", "messages", 0, "role")`` → ``messages[0].role``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in _UNION_LABELS or any(c in str(part) for c in "[(-"):
            continue  # pydantic's union member / validator labels are noise for a client
        else:
            out += f".{part}" if out else str(part)
    return out or None
