"""API keys, per-key rate limits and the request body limit, enforced before any route runs.

One ASGI middleware guards every path under ``/v1`` — routes added later included, so there is
no per-route opt-in to forget. Keys are compared in constant time (``hmac.compare_digest``)
against every configured key. Limits use the ``limits`` library's moving window, per key
(per client address in no-auth mode). Bodies over the limit are refused from their
``Content-Length`` or, for chunked uploads, as soon as the running total passes it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoglm_train.serve.errors import error_bytes
from autoglm_train.serve.metrics import Metrics

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/v1"


def is_protected(scope: Scope) -> bool:
    """Whether the request is for a ``/v1`` path, as the router will see it.

    The router matches the path without the ``root_path`` (an app mounted under ``/api``, or served behind a proxy
    with ``--root-path``, sees ``/api/v1/models``); checking the raw path alone would leave every route open there.
    """
    path, root = scope["path"], scope.get("root_path", "")
    paths = {path}
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        paths.add(path[len(root) :])
    return any(p == PROTECTED_PREFIX or p.startswith(PROTECTED_PREFIX + "/") for p in paths)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-upload. An ``HTTPException`` so that FastAPI's body reader passes it
    through as a 413 instead of wrapping it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the {limit:,}-byte limit")


def key_id(key: str) -> str:
    """A short, non-secret name for a key (logs, limiter buckets)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


class KeyChecker:
    """Constant-time check of a presented key against all configured keys (no early exit on a match)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def __call__(self, presented: str | None) -> bool:
        if presented is None:
            return False
        candidate = presented.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, candidate)
        return matched


class RateLimiter:
    """``limits`` moving-window limiter: ``hit(identity)`` → seconds to wait (0 when allowed)."""

    def __init__(self, spec: str) -> None:
        from limits import parse_many
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.items = parse_many(spec)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, identity: str) -> int:
        for item in self.items:
            if not self.limiter.hit(item, identity):
                reset, _ = self.limiter.get_window_stats(item, identity)
                return max(1, math.ceil(reset - time.time()))
        return 0


class Guard:
    """ASGI middleware: 401 without a valid key, 429 over the rate, 413 over the body size.

    Args:
        app: the wrapped application.
        keys: accepted keys; None disables authentication (``--no-auth``).
        rate_limit: ``limits`` spec per key (``"60/minute"``), None for no limit.
        max_body_bytes: largest accepted request body.
        metrics: counts 429s.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: list[str] | None,
        rate_limit: str | None,
        max_body_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.check = KeyChecker(keys) if keys is not None else None
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if is_protected(scope):
            identity = self._identity(scope, headers)
            if identity is None:
                # failed attempts are rate limited per client address too, so keys cannot be guessed at line speed
                client = (scope.get("client") or ("unknown", 0))[0]
                if await self._limited(send, f"unauthorised-{client}"):
                    return
                await _reply(
                    send,
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
                return
            if await self._limited(send, identity):
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _reply(send, 413, f"request body over the {self.max_body:,}-byte limit", code="request_too_large")
            return
        await self._with_body_limit(scope, receive, send)

    async def _limited(self, send: Send, identity: str) -> bool:
        """Count a request against ``identity``; True (and a 429 sent) when over the limit."""
        wait = self.limiter.hit(identity) if self.limiter is not None else 0
        if not wait:
            return False
        if self.metrics is not None:
            self.metrics.limited()
        await _reply(
            send,
            429,
            f"rate limit exceeded; retry in {wait} s",
            code="rate_limit_exceeded",
            headers={"retry-after": str(wait)},
        )
        return True

    def _identity(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """The rate-limit bucket of an authorised request, None when unauthorised."""
        if self.check is None:
            client = scope.get("client") or ("unknown", 0)
            return f"anonymous-{client[0]}"
        scheme, _, token = headers.get("authorization", "").partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else None
        return key_id(presented) if self.check(presented) else None

    async def _with_body_limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _reply(send, 413, f"request body over the {self.max_body:,}-byte limit", code="request_too_large")


async def _reply(send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    body = error_bytes(status, message, code=code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
