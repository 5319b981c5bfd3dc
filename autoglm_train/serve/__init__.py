"""OpenAI-compatible evaluation server for a serving bundle: ``python -m autoglm_train.serve --bundle DIR``.

``create_app(ServerConfig(...))`` builds the FastAPI app; the CLI wraps it in uvicorn.
Importing this package stays light: FastAPI, torch and the model load only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoglm_train.serve.app import create_app
    from autoglm_train.serve.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from autoglm_train.serve.app import create_app

        return create_app
    if name == "ServerConfig":
        from autoglm_train.serve.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'autoglm_train.serve' has no attribute {name!r}")
