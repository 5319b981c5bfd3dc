"""Run blocking generation on worker threads and hand its output to the event loop, cancellably.

``Worker.iterate(fn)`` runs ``fn(cancel)`` (a generator) on a thread pool and yields its items
asynchronously. Leaving the async iteration early for any reason — the client disconnected
(cancellation from the SSE response, or ``request.is_disconnected()`` seen while polling), an
error, a finished stream — sets ``cancel``, which the engine checks before every token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_ITEM, _ERROR, _END = 0, 1, 2


class Worker:
    """A fixed pool of generation threads.

    Args:
        max_workers: generations in progress at once; more requests wait for a free thread.
        on_cancel: called once per generation stopped early (metrics).
    """

    def __init__(self, max_workers: int, on_cancel: Callable[[], None] | None = None) -> None:
        self.max_workers = max_workers
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate")
        self.on_cancel = on_cancel
        self._closed = False

    def start(self) -> None:
        """A fresh pool after :meth:`shutdown`: an app can be started again (test clients, embedding servers)."""
        if self._closed:
            self.executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="generate")
            self._closed = False

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._closed = True

    async def iterate(
        self,
        fn: Callable[[threading.Event], Iterator[T]],
        disconnected: Callable[[], Any] | None = None,
        poll_s: float = 0.2,
    ) -> AsyncIterator[T]:
        """Items of ``fn(cancel)`` as they are produced on a worker thread.

        Args:
            fn: the blocking generator; it must stop soon after ``cancel`` is set.
            disconnected: an async callable (``request.is_disconnected``) polled every ``poll_s``
                while waiting; True cancels the generation. Leave None where the response
                itself notices disconnects (SSE).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def put(kind: int, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop closed under us (server shutting down): nobody is listening
                cancel.set()

        def run() -> None:
            try:
                for item in fn(cancel):
                    put(_ITEM, item)
                    if cancel.is_set():
                        break
            except BaseException as err:
                put(_ERROR, err)
            finally:
                put(_END, None)

        loop.run_in_executor(self.executor, run)
        finished = False
        next_check = loop.time() + poll_s
        try:
            while True:
                if disconnected is None:
                    kind, value = await queue.get()
                else:
                    # poll on a clock, not only when idle: a busy generation never leaves the queue empty
                    try:
                        kind, value = await asyncio.wait_for(queue.get(), timeout=max(0.0, next_check - loop.time()))
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
            if not finished:
                cancel.set()
                if self.on_cancel is not None:
                    self.on_cancel()
