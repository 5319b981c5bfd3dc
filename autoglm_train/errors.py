"""Errors the user fixes in the config or the inputs, and how the entry point reports them: one line, no traceback.

A wrong teacher path or a precision the hardware cannot run is not a bug in this code; a 20-line traceback hides the
one line that says what to change. Exceptions deriving from :class:`ConfigError` (and anything Hydra's
``instantiate`` raises while building a config node, which is where the typed configs check themselves) are printed
as ``error: <message>`` and the process exits with status 2. Everything else keeps its traceback.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

EXIT_CODE = 2
"""Exit status of a run refused for its config or inputs (1 stays for crashes)."""


class ConfigError(Exception):
    """Base of the errors a user fixes in the config or the inputs; messages name the config field."""


class ConfigValueError(ConfigError, ValueError):
    """A config value (or an input it points to) that cannot work."""


class ConfigPathError(ConfigError, FileNotFoundError):
    """A config path that does not exist."""


def config_error_line(err: BaseException) -> str | None:
    """The one line to print for ``err`` if the user caused it, else None (a bug: keep the traceback)."""
    from hydra.errors import InstantiationException

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConfigError):
            return " ".join(str(seen).split())
        seen = seen.__cause__
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        cause = err.__cause__
        key = re.search(r"full_key: (\S+)", str(err))
        where = f"{key[1]}: " if key else ""
        return " ".join(f"{where}{type(cause).__name__}: {cause}".split())
    return None


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn a config/input error raised inside into ``error: <line>`` on stderr and exit status 2."""
    try:
        yield
    except Exception as err:
        line = config_error_line(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None
