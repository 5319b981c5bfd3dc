"""What the engine raises when a request cannot be served: named for what happened, not for an HTTP status.

Training-time evaluation, the eval tools and the server all drive the engine; only the server speaks
HTTP, so it alone maps these to status codes (``autoglm_train.serve.errors``, in one table). Every
error carries what a client needs to fix its request: the message, the request field at fault and
a stable machine-readable code.
"""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine cannot serve as it is.

    Args:
        message: what went wrong and, where possible, what to do instead.
        param: the request field at fault (``messages``), when one is.
        code: a stable machine-readable code (``invalid_media``, ``plugin_unavailable``).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequest(EngineError):
    """The request itself is at fault: media a plugin cannot take, plugins trained on different prompt formats."""


class PluginUnavailable(EngineError):
    """A plugin the request needs could not be loaded: the fault is on the serving side, retrying may help."""
