"""Is a process (or a process group) still running? Zombies count as gone.

A killed rank stays a zombie until its parent reaps it, and ``kill(pid, 0)`` still succeeds on a zombie; the
preemption callback (naming a lost peer) and the fault-injection harness (waiting for a run's whole group to end)
both need "still doing work", which only the state field of ``/proc/<pid>/stat`` tells.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

_GONE_STATES = ("Z", "X")  # zombie, dead


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of a ``/proc/<pid>/stat`` after the command name (state first), or None if it vanished."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (unknown state, e.g. no ``/proc``: alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is None or fields[0] not in _GONE_STATES


def _group_members(pgid: int) -> Iterator[str]:
    """The state of every process whose process group is ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[2]) == pgid:
            yield fields[0]


def group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` still runs (zombies of an exited leader do not count)."""
    return any(state not in _GONE_STATES for state in _group_members(pgid))
