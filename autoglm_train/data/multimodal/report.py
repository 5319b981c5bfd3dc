"""Bad items are skipped and counted, never fatal (unless ``strict``): what was dropped and why."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from autoglm_train.errors import ConfigValueError

log = logging.getLogger(__name__)

MAX_EXAMPLES = 3


class BadItemError(ConfigValueError):
    """A bad item in ``strict`` mode."""


@dataclass
class SkipReport:
    """Counts per skip reason (with a few example locations) and notes about items that were fixed.

    Args:
        strict: raise :class:`BadItemError` at the first bad item instead of skipping it.
    """

    strict: bool = False
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        """Record one dropped item; ``reason`` is a short category, ``where`` names the item."""
        if self.strict:
            raise BadItemError(f"{where}: {reason} (data_mm.strict=true; set it false to skip and count)")
        self.skipped[reason] += 1
        found = self.examples.setdefault(reason, [])
        if len(found) < MAX_EXAMPLES:
            found.append(where)

    def note(self, what: str, count: int = 1) -> None:
        """Record items that were kept after a fix (e.g. resampled, cropped)."""
        self.notes[what] += count

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.seen - self.num_skipped,
            "skipped": dict(self.skipped),
            "notes": dict(self.notes),
            "examples": self.examples,
        }

    def log_summary(self, what: str) -> None:
        kept = self.seen - self.num_skipped
        log.info("%s: %d of %d items kept", what, kept, self.seen)
        for reason, count in self.skipped.most_common():
            log.warning("%s: skipped %d (%s), e.g. %s", what, count, reason, "; ".join(self.examples[reason]))
        for note, count in self.notes.most_common():
            log.info("%s: %d %s", what, count, note)
