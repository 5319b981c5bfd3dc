"""What every request handler shares: the engine, the worker (admission and relay), metrics, settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from autoglm_train.engine.engine import Engine
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.metrics import Metrics
from autoglm_train.serve.worker import Worker


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    worker: Worker
    metrics: Metrics
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        """Prompt + completion bound: the decoder's context, lowered by ``--max-model-len``."""
        return min(self.engine.max_model_len, self.config.max_model_len or self.engine.max_model_len)


def get_state(request: Request) -> ServerState:
    return request.app.state.server
