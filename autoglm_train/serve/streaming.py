"""Server-sent events in OpenAI's framing: one ``data: {json}`` per chunk, then ``data: [DONE]``.

``sse-starlette`` does the transport: keep-alive pings, and it cancels the producing coroutine
when the client goes away, which cancels the generation behind it (see ``worker.py``). An error
after the stream has started is sent as a final ``{"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette.sse import EventSourceResponse

from autoglm_train.engine.errors import EngineError
from autoglm_train.serve.errors import APIError, api_error, error_body

log = logging.getLogger(__name__)

DONE = "[DONE]"
PING_SECONDS = 15


def sse_response(chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """Stream ``chunks`` as SSE ``data:`` events ending with ``data: [DONE]``."""

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
        except (APIError, EngineError) as err:
            err = api_error(err) if isinstance(err, EngineError) else err
            yield {"data": json.dumps(error_body(err.status, err.message, err.param, err.code))}
        except Exception as err:
            log.exception("error while streaming")
            yield {
                "data": json.dumps(
                    error_body(500, f"internal server error ({type(err).__name__})", code="internal_error")
                )
            }
        yield {"data": DONE}

    return EventSourceResponse(events(), ping=PING_SECONDS, headers={"cache-control": "no-store"})
