"""Hostile clients against the server on a tiny real model: no way around the key on any ``/v1`` route, rate limits
that hold under concurrent load, and slow or stalled clients that cannot stall anyone else (real uvicorn on
127.0.0.1, raw sockets where a well-behaved HTTP client would not do what an attacker does)."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections import Counter
from contextlib import ExitStack

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Mount

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.local import running_server
from autoglm_train.serve.security import PROTECTED_PREFIX
from tests.serve_support import KEY, MODEL, OTHER_KEY, one_thread

AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN_ROUTES = {"/health", "/metrics", "/openapi.json"}
"""Everything outside /v1: probes, Prometheus, the schema. A new route elsewhere must be added here on purpose."""
NORMAL = {"model": MODEL, "prompt": "The quick", "max_tokens": 6, "temperature": 0}
NORMAL_TEXT = " brown fox jumps over the lazy"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles.full


@pytest.fixture(scope="module")
def engine(bundle):
    return Engine(read_bundle(bundle))


@pytest.fixture
def make_app(bundle, engine):
    def make(**overrides):
        return create_app(ServerConfig(**{"bundle": str(bundle), "api_keys": [KEY, OTHER_KEY], **overrides}), engine)

    return make


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def all_routes(app) -> list[tuple[str, set[str]]]:
    """``(path, methods)`` of every route of ``app``, included routers and mounts flattened (any FastAPI version)."""
    found = []
    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):  # FastAPI >= 0.16x keeps included routers as one entry
            found += [(ctx.path, set(ctx.methods or ())) for ctx in route.effective_route_contexts()]
        elif hasattr(route, "routes") and hasattr(route, "path"):  # a Mount
            found += [(route.path + path, methods) for path, methods in all_routes(route)]
        else:
            found.append((route.path, set(getattr(route, "methods", None) or ())))
    return found


# --- authentication ---------------------------------------------------------------------------------------------
WRONG_CREDENTIALS = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": f"Bearer {KEY.upper()}"},
    {"Authorization": KEY},
    {"Authorization": f"Token {KEY}"},
    {"Authorization": f"Basic {base64.b64encode(f'{KEY}:'.encode()).decode()}"},
    {"X-API-Key": KEY},
    {"Cookie": f"api_key={KEY}"},
]


def test_every_route_outside_v1_is_a_known_open_one(make_app) -> None:
    paths = {path for path, _ in all_routes(make_app())}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= paths
    assert {p for p in paths if not _protected(p)} == OPEN_ROUTES


def test_auth_cannot_be_bypassed_on_any_v1_route(make_app) -> None:
    app = make_app(rate_limit=None)
    routes = [(path, methods) for path, methods in all_routes(app) if _protected(path)]
    assert len(routes) >= 4
    targets = {(m, path.replace("{model_id:path}", MODEL)) for path, methods in routes for m in methods | {"HEAD"}}
    targets |= {(m, p) for _, p in targets for m in ("OPTIONS", "PUT", "DELETE", "PATCH")}  # methods with no route
    targets |= {("GET", "/v1"), ("GET", "/v1/"), ("GET", "/v1/models/"), ("POST", "/v1/nowhere")}
    tried = 0
    with TestClient(app) as client:
        for method, path in sorted(targets):
            for headers in WRONG_CREDENTIALS:
                response = client.request(method, path, headers=headers, params={"api_key": KEY}, json={})
                assert response.status_code == 401, (method, path, headers, response.status_code)
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "invalid_api_key"
                tried += 1
        assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert tried >= 100


def test_a_mounted_app_is_guarded_too(make_app) -> None:
    """Under a prefix (Mount, or uvicorn --root-path) the router strips the prefix; the key check must as well."""
    parent = Starlette(routes=[Mount("/api", app=make_app(rate_limit=None))])
    with TestClient(parent) as client:
        assert client.get("/api/v1/models").status_code == 401
        assert client.post("/api/v1/completions", json=NORMAL).status_code == 401
        assert client.get("/api/v1/models", headers=AUTH).status_code == 200


def _raw(url: str, request: bytes, timeout: float = 10.0) -> int:
    """Send ``request`` byte for byte (no client-side path normalisation) and return the status code."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


PATH_TRICKS = [
    b"/v1/../v1/models", b"/%76%31/models", b"/v1%2Fmodels", b"/v1/models%2F", b"/v1/./models", b"//v1/models",
    b"/./v1/models", b"/V1/models", b"http://127.0.0.1/v1/models", b"/v1/models?api_key=" + KEY.encode(),
]  # fmt: skip


def test_path_tricks_on_the_wire_never_reach_a_route_without_a_key(make_app) -> None:
    with running_server(make_app(rate_limit=None)) as url:
        statuses = {t: _raw(url, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % t) for t in PATH_TRICKS}
    assert set(statuses.values()) <= {401, 404}, statuses


# --- rate limits ---------------------------------------------------------------------------------------------------
async def _burst(url: str, requests: list[tuple[str, str, dict, dict | None]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        calls = [http.request(method, path, headers=headers, json=body) for method, path, headers, body in requests]
        return await asyncio.gather(*calls)


def test_rate_limit_holds_under_concurrent_load(make_app) -> None:
    with running_server(make_app(rate_limit="20/minute")) as url:
        mixed = [("GET", "/v1/models", AUTH, None)] * 40 + [("POST", "/v1/completions", AUTH, NORMAL)] * 20
        responses = asyncio.run(_burst(url, mixed))
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 20, 429: 40}, statuses  # exactly the limit, however the 60 arrive
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in responses if r.status_code == 429)
        served = [r.json()["choices"][0]["text"] for r in responses if r.status_code == 200 and "choices" in r.json()]
        assert served == [NORMAL_TEXT] * len(served)  # what got through is answered correctly

        other = asyncio.run(_burst(url, [("GET", "/v1/models", {"Authorization": f"Bearer {OTHER_KEY}"}, None)] * 5))
        assert [r.status_code for r in other] == [200] * 5  # one key's flood does not lock out another key

        guesses = [("GET", "/v1/models", {"Authorization": f"Bearer guess-{i}"}, None) for i in range(50)]
        statuses = Counter(r.status_code for r in asyncio.run(_burst(url, guesses)))
        assert statuses == {401: 20, 429: 30}, statuses  # key guessing is throttled per client address


# --- slow and stalled clients --------------------------------------------------------------------------------------
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _stall(url: str, stack: ExitStack) -> None:
    """Open the connections no well-behaved client makes; they stay open until ``stack`` closes."""
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\n"
    for _ in range(20):  # slowloris: half a request head, then silence
        stack.enter_context(_connect(url)).sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
    for _ in range(5):  # a body that never finishes arriving
        stack.enter_context(_connect(url)).sendall(f"{head}Content-Length: 10000\r\n\r\n".encode() + b'{"mod')
    body = f'{{"model": "{MODEL}", "prompt": "The quick", "max_tokens": 3000, "ignore_eos": true, "stream": true}}'
    for _ in range(3):  # streams whose reader takes the first bytes, then never reads again (socket kept open)
        sock = stack.enter_context(_connect(url))
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


def test_slow_and_stalled_clients_do_not_stall_others(make_app) -> None:
    app = make_app(rate_limit=None, max_concurrency=4)
    metrics = app.state.server.metrics
    with running_server(app) as url:
        with ExitStack() as stalled:
            _stall(url, stalled)
            latencies = []
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
                for _ in range(10):
                    start = time.perf_counter()
                    response = http.post("/v1/completions", json=NORMAL)
                    latencies.append(time.perf_counter() - start)
                    assert response.status_code == 200 and response.json()["choices"][0]["text"] == NORMAL_TEXT
                assert http.get("/health").status_code == 200
            assert max(latencies) < 10.0, latencies
            cancelled = metrics.cancelled
        # the stalled streams hung up: their generations stop instead of running on to max_tokens
        deadline = time.monotonic() + 15
        while metrics.cancelled < cancelled + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.cancelled == cancelled + 3
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            assert http.post("/v1/completions", json=NORMAL).json()["choices"][0]["text"] == NORMAL_TEXT
