"""Step-by-step progress for long export/verify stages (rich, on stderr)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Steps:
    """Prints ``[i/n] what ... done (1.2 s)`` per step; ``track`` shows a bar inside a step.

    Args:
        total: number of steps, for the ``[i/n]`` counter.
        enabled: False prints nothing (tests, library use).
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        from rich.console import Console

        self.total = total
        self.index = 0
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False)
        self._progress = None

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.index += 1
        label = f"[{self.index}/{self.total}] {what}"
        start = time.perf_counter()
        if not self.enabled:
            yield
            return
        self.console.print(label + " ...")
        yield
        self.console.print(f"{label} [green]done[/green] ({time.perf_counter() - start:.1f} s)")

    def bar(self, what: str, total: int):
        """A progress bar for ``total`` items; returns a callable advancing it by one (no-op when disabled)."""
        if not self.enabled:
            return lambda *_: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn(f"    {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console
        )
        task = progress.add_task(what, total=total)
        progress.start()

        def advance(*_) -> None:
            progress.advance(task)
            if progress.finished:
                progress.stop()

        return advance
