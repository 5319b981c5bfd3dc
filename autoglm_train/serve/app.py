"""``create_app``: the FastAPI application around one engine, with its guards, metrics and error shape."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from autoglm_train.engine.engine import Engine
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.errors import install_error_handlers
from autoglm_train.serve.metrics import Metrics, MetricsMiddleware
from autoglm_train.serve.routes import ops, v1
from autoglm_train.serve.security import Guard
from autoglm_train.serve.state import ServerState
from autoglm_train.serve.worker import Worker

log = logging.getLogger(__name__)


def build_engine(config: ServerConfig) -> Engine:
    """Read the bundle and load the decoder (plugins stay on disk until a request needs them)."""
    import torch

    from autoglm_train.engine.bundle import read_bundle, verify_bundle_files

    if config.threads:
        torch.set_num_threads(config.threads)
    bundle = read_bundle(config.bundle)
    if config.verify_checksums:
        log.info("bundle %s: %d files match manifest.json", bundle.root, verify_bundle_files(bundle))
    return Engine(
        bundle, device=config.device, dtype=config.dtype, quantize=config.quantize, max_model_len=config.max_model_len
    )


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` (built from ``config.bundle`` when not given).

    Middleware order, outermost first: metrics (counts every response, refusals included),
    then the guard (401 / 429 / 413 for every ``/v1`` path), then the routes.
    """
    engine = engine or build_engine(config)
    metrics = Metrics(engine.loaded_modules, routes={route.path for router in (v1, ops) for route in router.routes})
    worker = Worker(config.max_concurrency, on_cancel=metrics.cancel)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.shutdown()

    app = FastAPI(title="autoglm-train OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState(
        config=config, engine=engine, worker=worker, metrics=metrics, model_name=config.model_name or engine.bundle.name
    )
    app.include_router(v1)
    app.include_router(ops)
    install_error_handlers(app)
    keys = None if config.no_auth else config.api_keys
    app.add_middleware(
        Guard, keys=keys, rate_limit=config.rate_limit, max_body_bytes=config.max_body_bytes, metrics=metrics
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
