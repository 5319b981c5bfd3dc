"""Property-based fuzzing of the server against the app on a tiny real model: no request gets a 5xx.

Two generators, each with a valid key: schemathesis, from the OpenAPI schema (schema-valid and schema-violating
requests for every operation), and field mutation: a valid body with one field (or the first message's content)
replaced by any JSON value, including huge integers and lone surrogate escapes (``"\\ud800"``), which
schema-driven generation rarely produces. Every refusal must use the OpenAI error shape. Derandomized, so CI sees
the same cases each run; ``-m slow`` runs a larger random search.
"""

from __future__ import annotations

import json

import pytest
import schemathesis  # the dev extra; it brings hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.schemas import ChatCompletionRequest, CompletionRequest
from tests.serve_support import KEY, MODEL, QUESTION, one_thread

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def app(bundles):
    bundle = bundles.full
    # small bounds keep every fuzzed generation short; the checks under test are the same at any size
    config = ServerConfig(
        bundle=str(bundle), api_keys=[KEY], rate_limit=None, max_model_len=96, max_tokens_cap=8,
        default_max_tokens=4, max_n=2, max_batch_prompts=4, max_body_bytes=64 * 1024,
    )  # fmt: skip
    return create_app(config, Engine(read_bundle(bundle)))


@pytest.fixture(scope="module")
def cases(app):
    """One strategy over every operation, schema-valid and schema-violating requests alike."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= paths
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in modes]), len(paths)


def _settings(max_examples: int, derandomize: bool) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _check(response, where: str, statuses: dict[int, int]) -> None:
    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], where


def _fuzz(cases, max_examples: int, derandomize: bool) -> dict[int, int]:
    strategy, _ = cases
    statuses: dict[int, int] = {}

    @_settings(max_examples, derandomize)
    @given(case=strategy, served_model=st.booleans())
    def check(case, served_model: bool) -> None:
        if served_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # past the model check, into tokenizing and generation
        where = f"{case.method} {case.formatted_path} body={json.dumps(case.body, default=str)[:500]}"
        _check(case.call(headers=AUTH), where, statuses)

    check()
    return statuses


# Any JSON value: huge integers, non-finite-free floats, strings with lone surrogates, nested lists and objects.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([-(2**63) - 1, 2**63, 2**64, 10**30, -1, 0])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(categories=["L", "N", "P", "Zs", "Cc", "Cs"]), max_size=12)
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
# Values that broke servers before (lone surrogates, 64-bit edges, NUL, bidi overrides, huge strings), half the time.
NASTY = st.sampled_from(
    ["\ud800", "x\udfffy", "\x00", "", " ", "\u202e", "🙂" * 50, "a" * 5000, 2**64, 2**63, -(2**63) - 1, 10**30, -1, 0,
     1.5, 1e308, [], {}, [[]], [""], {"": None}, None, True]
)  # fmt: skip
VALUES = st.one_of(NASTY, JSON_VALUES)
BASES = {
    "/v1/chat/completions": ({"model": MODEL, "messages": QUESTION, "max_tokens": 4}, ChatCompletionRequest),
    "/v1/completions": ({"model": MODEL, "prompt": "The quick", "max_tokens": 4}, CompletionRequest),
}


def _mutations(app, max_examples: int, derandomize: bool) -> dict[int, int]:
    from fastapi.testclient import TestClient

    statuses: dict[int, int] = {}
    targets = [(path, field) for path, (_, model) in BASES.items() for field in [*model.model_fields, "content"]]

    @_settings(max_examples, derandomize)
    @given(target=st.sampled_from(targets), value=VALUES)
    def check(target: tuple[str, str], value) -> None:
        path, field = target
        body = json.loads(json.dumps(BASES[path][0]))
        if field == "content" and "messages" in body:
            body["messages"][0]["content"] = value
        else:
            body[field] = value
        raw = json.dumps(body)  # ensure_ascii: a lone surrogate goes out as a \udXXX escape, valid JSON
        response = client.post(path, headers={**AUTH, "content-type": "application/json"}, content=raw)
        _check(response, f"POST {path} {raw[:500]}", statuses)

    with TestClient(app, raise_server_exceptions=False) as client:  # lifespan on, as under uvicorn
        check()
    return statuses


def test_schema_fuzzed_requests_never_get_a_server_error(cases) -> None:
    statuses = _fuzz(cases, max_examples=150, derandomize=True)
    assert sum(statuses.values()) >= 150
    assert statuses.get(200, 0) > 0 and any(400 <= s < 500 for s in statuses), statuses  # both sides were reached


def test_field_mutations_never_get_a_server_error(app) -> None:
    statuses = _mutations(app, max_examples=200, derandomize=True)
    assert sum(statuses.values()) >= 200 and statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0, statuses


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [  # what the first fuzzing runs found (each was a 500), and their neighbours
        ("seed", 2**64 - 1, 200),
        ("seed", 2**64, 422),
        ("seed", -(2**63), 200),
        ("seed", -(2**63) - 1, 422),
        ("prompt", "\ud800", 422),
        ("model", "\udfff", 422),
        ("stop", ["\udc00"], 422),
        ("logit_bias", {"\ud800": 1}, 422),
    ],
)
def test_found_by_fuzzing(app, field: str, value, status: int) -> None:
    from fastapi.testclient import TestClient

    raw = json.dumps({**BASES["/v1/completions"][0], field: value})
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/completions", headers={**AUTH, "content-type": "application/json"}, content=raw)
    assert response.status_code == status, response.text


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_server_error_long(cases, app) -> None:
    assert sum(_fuzz(cases, max_examples=2000, derandomize=False).values()) >= 2000
    assert sum(_mutations(app, max_examples=2000, derandomize=False).values()) >= 2000
