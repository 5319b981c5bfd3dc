"""Relay a generation's output from the engine's loop thread to the event loop, cancellably.

``Worker.iterate(produce)`` calls ``produce(emit, done, cancel)``, which queues the work on the
engine's generation thread (:meth:`Engine.submit_many`) and returns at once; that thread then calls
``emit(item)`` per item and ``done(error or None)`` at the end, and ``iterate`` yields the items
asynchronously. Leaving the async iteration early for any reason — the client disconnected
(cancellation from the SSE response, or ``request.is_disconnected()`` seen while polling), an
error, a finished stream — sets ``cancel``, which the engine checks before every token.

Why no thread per request: the generation thread already produces every request's tokens; a relay
thread per request would wake once per token (16 clients: 16 extra thread switches and GIL hand-offs
per decode step, on the cores the decode step needs). Items go through a :class:`_Mailbox` instead,
which wakes the event loop once per burst (one decode step's tokens for every request), not once per token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger(__name__)

_ITEM, _ERROR, _END = 0, 1, 2

Emit = Callable[[Any], None]
Done = Callable[[BaseException | None], None]
Producer = Callable[[Emit, Done, threading.Event], None]
"""``produce(emit, done, cancel)``: start the work and return; ``emit``/``done`` may be called from any thread."""


class _Mailbox:
    """Thread-safe hand-off of ``(asyncio.Queue, item)`` pairs to one event loop, one wake-up per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item: Any) -> bool:
        """Deliver ``item`` into ``queue`` on the loop; False when the loop has closed (nobody listens)."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed under us (server shutting down)
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Worker:
    """Admission (at most ``max_concurrent`` generations in progress) and relay of their output.

    Args:
        max_concurrent: generations in progress at once; more requests wait for a free slot.
        on_cancel: called once per generation stopped early (metrics).
    """

    def __init__(self, max_concurrent: int, on_cancel: Callable[[], None] | None = None) -> None:
        self.max_concurrent = max_concurrent
        self.on_cancel = on_cancel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._mailbox: _Mailbox | None = None
        self._active: set[threading.Event] = set()

    def start(self) -> None:
        """Fresh per-loop state: an app can be started again on another loop (test clients, embedding servers)."""
        self._loop = None

    def shutdown(self) -> None:
        """Stop every generation in progress (the engine drops their rows at its next step)."""
        for cancel in list(self._active):
            cancel.set()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Semaphore, _Mailbox]:
        if self._loop is not loop:
            self._loop, self._slots, self._mailbox = loop, asyncio.Semaphore(self.max_concurrent), _Mailbox(loop)
        assert self._slots is not None and self._mailbox is not None
        return self._slots, self._mailbox

    async def iterate(
        self,
        produce: Producer,
        disconnected: Callable[[], Any] | None = None,
        poll_s: float = 0.2,
    ) -> AsyncIterator[Any]:
        """Items of ``produce`` as the generation thread emits them.

        Args:
            produce: starts the work (see :data:`Producer`); it must stop soon after ``cancel`` is set.
            disconnected: an async callable (``request.is_disconnected``) polled every ``poll_s``
                while waiting; True cancels the generation. Leave None where the response
                itself notices disconnects (SSE).
        """
        loop = asyncio.get_running_loop()
        slots, mailbox = self._bind(loop)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            if not mailbox.post(queue, (_ITEM, item)):
                cancel.set()

        def done(error: BaseException | None) -> None:
            mailbox.post(queue, (_END, None) if error is None else (_ERROR, error))

        finished = False
        async with slots:
            self._active.add(cancel)
            try:
                produce(emit, done, cancel)
                next_check = loop.time() + poll_s
                while True:
                    if disconnected is None:
                        kind, value = await queue.get()
                    else:
                        # poll on a clock, not only when idle: a busy generation never leaves the queue empty
                        try:
                            timeout = max(0.0, next_check - loop.time())
                            kind, value = await asyncio.wait_for(queue.get(), timeout=timeout)
                        except asyncio.TimeoutError:
                            kind = None
                        if loop.time() >= next_check:
                            next_check = loop.time() + poll_s
                            if await disconnected():
                                log.info("client disconnected: generation cancelled")
                                return
                        if kind is None:
                            continue
                    if kind == _END:
                        finished = True
                        return
                    if kind == _ERROR:
                        finished = True
                        raise value
                    yield value
            finally:
                self._active.discard(cancel)
                if not finished:
                    cancel.set()
                    if self.on_cancel is not None:
                        self.on_cancel()
