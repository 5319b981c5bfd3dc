"""The exception a request handler raises; free of FastAPI, so the engine (used in training too) needs no web stack."""

from __future__ import annotations


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
