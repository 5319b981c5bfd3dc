"""The OpenAI-compatible API through FastAPI's TestClient on a tiny real bundle: behaviour and every error path."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from fastapi.testclient import TestClient

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.routes import v1
from tests.serve_support import (
    ANSWER,
    KEY,
    MODEL,
    OTHER_KEY,
    QUESTION,
    REASONING,
    SENTENCE,
    metric_value,
    one_thread,
    png_data_url,
    wav_base64,
)

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def engine(bundles):
    return Engine(read_bundle(bundles.full))


@pytest.fixture
def make_client(engine, bundles):
    def make(engine_=None, **overrides) -> TestClient:
        config = ServerConfig(**{"bundle": str(bundles.full), "api_keys": [KEY, OTHER_KEY], **overrides})
        return TestClient(create_app(config, engine_ or engine))

    return make


@pytest.fixture
def client(make_client):
    return make_client()


def chat(client, headers=AUTH, **body):
    payload = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40, **body}
    return client.post("/v1/chat/completions", headers=headers, json=payload)


def sse_chunks(response) -> list:
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# --- the API ------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    data = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    assert data[0]["modalities"] == ["text", "image_url", "input_audio"] and data[0]["thinking"] is True
    assert client.get(f"/v1/models/{MODEL}", headers=AUTH).json()["id"] == MODEL
    assert_error(client.get("/v1/models/gpt-4", headers=AUTH), 404, "model_not_found")


def test_chat_thinking_reasoning_returned_when_asked_stripped_otherwise(client):
    asked = chat(client, return_reasoning=True).json()
    message = asked["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    assert asked["choices"][0]["finish_reason"] == "stop"
    usage = asked["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stripped = chat(client).json()["choices"][0]["message"]
    assert stripped == {"role": "assistant", "content": ANSWER}
    via_kwargs = chat(client, chat_template_kwargs={"enable_thinking": True, "return_reasoning": True}).json()
    assert via_kwargs["choices"][0]["message"]["reasoning_content"] == REASONING


def test_enable_thinking_switches_the_template(client, engine):
    on = engine.render_chat(QUESTION, {"enable_thinking": True})
    off = engine.render_chat(QUESTION, {"enable_thinking": False})
    assert "</think>" in off and "</think>" not in on
    response = chat(client, enable_thinking=False, return_reasoning=True).json()
    assert response["usage"]["prompt_tokens"] == len(engine.encode(off, add_special_tokens=False))
    assert "<think>" not in response["choices"][0]["message"]["content"]


def test_chat_stream_matches_non_stream(client):
    with client.stream(
        "POST", "/v1/chat/completions", headers=AUTH, json=_body(stream=True, return_reasoning=True)
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(r)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_stream_usage_chunk_and_stripped_reasoning(client):
    body = _body(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as r:
        chunks = sse_chunks(r)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all("reasoning_content" not in c["choices"][0]["delta"] for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == ANSWER


def test_stop_max_tokens_n_seed_and_chat_logprobs(client):
    stopped = chat(client, stop=["make"], return_reasoning=True).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["reasoning_content"] == "Two and two"
    short = chat(client, max_tokens=3).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    sampled = [chat(client, temperature=1.5, seed=11, n=3, max_tokens=6).json() for _ in range(2)]
    assert [c["index"] for c in sampled[0]["choices"]] == [0, 1, 2]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # same seed, same choices
    assert (
        sampled[0]["usage"]["completion_tokens"]
        == sum(6 if c["finish_reason"] == "length" else 1 for c in sampled[0]["choices"])
        or sampled[0]["usage"]["completion_tokens"] <= 18
    )
    logprobs = chat(client, logprobs=True, top_logprobs=2, max_tokens=4).json()["choices"][0]["logprobs"]["content"]
    assert len(logprobs) == 4 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in logprobs)


def test_completions_echo_logprobs_for_loglikelihood(client, engine):
    """The lm-eval local-completions request: token ids, echo, max_tokens=1, logprobs=1."""
    ids = engine.encode(SENTENCE)
    body = {"model": MODEL, "prompt": [ids, ids[:5]], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    out = client.post("/v1/completions", headers=AUTH, json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    first = out["choices"][0]["logprobs"]
    assert len(first["tokens"]) == len(ids) + 1 and first["token_logprobs"][0] is None
    assert first["top_logprobs"][0] is None and all(len(t) == 1 for t in first["top_logprobs"][1:])
    continuation = first["token_logprobs"][3:-1]
    assert sum(continuation) < 0 and all(lp > math.log(0.5) for lp in continuation)  # memorised: near-certain
    is_greedy = all(lp == max(top.values()) for lp, top in zip(continuation, first["top_logprobs"][3:-1], strict=True))
    assert is_greedy
    assert out["usage"]["prompt_tokens"] == len(ids) + 5


def test_completions_scoring_only_with_max_tokens_zero(client):
    body = {"model": MODEL, "prompt": SENTENCE, "max_tokens": 0, "logprobs": 0, "echo": True}
    choice = client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]
    assert choice["text"] == SENTENCE and "".join(choice["logprobs"]["tokens"]) == SENTENCE
    assert choice["logprobs"]["text_offset"][:2] == [0, len(choice["logprobs"]["tokens"][0])]


def test_completions_text_and_stream(client):
    body = {"model": MODEL, "prompt": "The quick brown", "max_tokens": 20, "temperature": 0, "stop": [" lazy"]}
    text = client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]
    assert text == {"index": 0, "text": " fox jumps over the", "logprobs": None, "finish_reason": "stop"}
    with client.stream("POST", "/v1/completions", headers=AUTH, json={**body, "stream": True, "echo": True}) as r:
        chunks = sse_chunks(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "The quick brown fox jumps over the"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _body(**extra):
    return {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40, **extra}


# --- modalities and on-demand loading -----------------------------------------------------
def _image_message(url: str) -> list:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Which digit?"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def test_text_only_traffic_never_loads_a_plugin_and_an_image_loads_only_vision(make_client, bundles, caplog):
    engine = Engine(read_bundle(bundles.full))  # fresh: nothing loaded yet
    client = make_client(engine)
    chat(client)
    client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "The", "max_tokens": 2})
    assert client.get("/health").json()["modules"] == {"decoder": "cpu", "vision": None, "speech": None}
    assert len(engine.model.plugins) == 0
    with caplog.at_level("INFO", logger="autoglm_train"):
        response = chat(client, messages=_image_message(png_data_url()), max_tokens=3)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > len(engine.encode("Which digit?"))
    assert set(engine.model.plugins) == {"vision"} and "vision" in engine.model.last_gates
    assert any("vision plugin loaded onto cpu" in r.getMessage() for r in caplog.records)
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "autoglm_module_loaded", module="vision", device="cpu") == 1
    assert metric_value(metrics, "autoglm_module_loaded", module="speech", device="none") == 0


def test_audio_goes_to_the_speech_plugin(client, engine):
    content = [{"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}}]
    response = chat(client, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert response.status_code == 200, response.text
    assert "speech" in engine.model.plugins
    too_short = [{"type": "input_audio", "input_audio": {"data": wav_base64(seconds=0.005)}}]
    error = assert_error(chat(client, messages=[{"role": "user", "content": too_short}]), 400, "invalid_media")
    assert "shorter than" in error["message"]


def test_a_plugin_that_fails_to_load_is_a_503_and_text_keeps_working(make_client, bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundles.full, broken)
    (broken / "plugins" / "vision" / "model.safetensors").write_bytes(b"not safetensors")
    client = make_client(Engine(read_bundle(broken)), bundle=str(broken))
    error = assert_error(chat(client, messages=_image_message(png_data_url())), 503, "plugin_unavailable")
    assert "vision" in error["message"]
    assert chat(client).json()["choices"][0]["message"]["content"] == ANSWER


def test_image_errors(client):
    error = assert_error(
        chat(client, messages=_image_message("http://example.com/cat.png")), 400, "unsupported_image_url"
    )
    assert "data:image/png;base64" in error["message"] and error["param"] == "messages[0].content[1].image_url.url"
    assert_error(chat(client, messages=_image_message("data:image/png;base64,%%%")), 400, "invalid_image")


def test_modality_missing_from_the_bundle_is_a_400_naming_it(make_client, bundles):
    text_only = Engine(read_bundle(bundles.text_only))
    client = make_client(text_only, bundle=str(bundles.text_only), model_name=MODEL)
    error = assert_error(chat(client, messages=_image_message(png_data_url())), 400, "unsupported_modality")
    assert "image" in error["message"] and "plugins: none" in error["message"]
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav_base64()}}]}]
    assert "audio" in assert_error(chat(client, messages=audio), 400, "unsupported_modality")["message"]


# --- security and limits ------------------------------------------------------------------
def test_every_v1_route_requires_a_valid_key(client):
    routes = [(method, route.path.replace("{model_id:path}", MODEL)) for route in v1.routes for method in route.methods]
    assert {path for _, path in routes} >= {"/v1/models", "/v1/chat/completions", "/v1/completions"}
    for method, path in [*routes, ("GET", "/v1/not-a-route"), ("GET", "/v1")]:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
        ):
            assert_error(client.request(method, path, headers=headers, json={}), 401, "invalid_api_key")
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
    assert client.get("/health").status_code == 200  # operations endpoints stay open for probes


def test_no_auth_mode_only_when_asked(make_client):
    client = make_client(api_keys=["EMPTY"])
    assert client.get("/v1/models").status_code == 200


def test_rate_limit_per_key_with_retry_after(make_client):
    client = make_client(rate_limit="3/minute")
    assert [client.get("/v1/models", headers=AUTH).status_code for _ in range(3)] == [200] * 3
    limited = client.get("/v1/models", headers=AUTH)
    assert_error(limited, 429, "rate_limit_exceeded")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
    assert metric_value(client.get("/metrics").text, "autoglm_rate_limited_total") == 1
    guesses = [client.get("/v1/models", headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(4)]
    assert guesses == [401, 401, 401, 429]  # wrong keys are throttled per client address


def test_oversize_body_is_413(make_client):
    client = make_client(max_body_bytes=2000)
    big = chat(client, messages=[{"role": "user", "content": "x" * 5000}])
    assert_error(big, 413, "request_too_large")
    chunked = client.post(
        "/v1/chat/completions",
        headers={**AUTH, "content-type": "application/json"},
        content=iter([b"{" + b" " * 3000, b"}"]),
    )
    assert_error(chunked, 413, "request_too_large")


def test_prompt_and_max_tokens_bounds(make_client):
    client = make_client(max_model_len=64, max_tokens_cap=32)
    long_prompt = [{"role": "user", "content": "word " * 100}]
    error = assert_error(chat(client, messages=long_prompt, max_tokens=8), 400, "context_length_exceeded", "messages")
    assert "maximum context length is 64 tokens" in error["message"]
    assert_error(chat(client, max_tokens=60), 400, "invalid_value", "max_tokens")
    fits = chat(client, messages=[{"role": "user", "content": "word " * 30}], max_tokens=None)
    assert fits.status_code == 200  # no max_tokens: the default shrinks to the room left in the context
    assert fits.json()["usage"]["total_tokens"] <= 64
    body = {"model": MODEL, "prompt": "word " * 60, "max_tokens": 16}
    assert_error(client.post("/v1/completions", headers=AUTH, json=body), 400, "context_length_exceeded", "prompt")


def test_malformed_json_and_invalid_fields_use_the_openai_error_shape(client):
    bad_json = client.post(
        "/v1/chat/completions", headers={**AUTH, "content-type": "application/json"}, content=b"{nope"
    )
    assert_error(bad_json, 400, "invalid_json")
    assert_error(chat(client, temperature=5), 422, "invalid_value", "temperature")
    assert_error(chat(client, messages=[{"role": "wizard", "content": "hi"}]), 422, "invalid_value", "messages[0].role")
    assert_error(chat(client, messages=[]), 422, "invalid_value", "messages")
    assert_error(chat(client, n=99), 400, "invalid_value", "n")
    assert_error(chat(client, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter")
    assert_error(chat(client, model="other"), 404, "model_not_found")
    assert_error(
        client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": [[10**7]]}), 400, "invalid_value"
    )
    assert_error(client.get("/nowhere"), 404)


def test_metrics_count_requests_tokens_and_latency(client):
    chat(client, max_tokens=2)
    text = client.get("/metrics").text
    chat_route = {"route": "/v1/chat/completions"}
    assert metric_value(text, "autoglm_requests_total", **chat_route, method="POST", status="200") == 1
    assert metric_value(text, "autoglm_request_duration_seconds_count", **chat_route) == 1
    assert metric_value(text, "autoglm_tokens_total", kind="completion") == 2
    assert metric_value(text, "autoglm_time_to_first_token_seconds_count") == 1
    assert metric_value(text, "autoglm_module_loaded", module="decoder", device="cpu") == 1


@pytest.mark.isolated  # runs the int8pack kernel: a crash fails this test alone
def test_int8_quantized_decoder_still_answers(make_client, bundles):
    engine = Engine(read_bundle(bundles.full), quantize="int8")
    assert "int8" in engine.describe()[0]
    out = chat(make_client(engine), max_tokens=40, return_reasoning=True).json()["choices"][0]["message"]
    assert out["content"] == ANSWER and out["reasoning_content"] == REASONING


def test_serves_a_bundle_written_by_the_export_tool(make_client, bundles, tmp_path):
    """The real exporter's layout (manifest forms/modules, sha256 table) is read and verified as-is."""
    from autoglm_train.export import bundle as export

    options = export.ExportOptions(
        decoder=str(bundles.full / "decoder"),
        out=str(tmp_path / "exported"),
        plugins=[str(bundles.full / "plugins" / "vision")],
        name=MODEL,
        dtype="float32",
        int8=False,
        gguf=[],
        onnx=False,
        verify=False,
        progress=False,
    )
    out, _ = export.export_bundle(options)
    config = ServerConfig(bundle=str(out), api_keys=[KEY], verify_checksums=True)
    client = TestClient(create_app(config))
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["modalities"] == ["text", "image_url"]
    message = chat(client, return_reasoning=True).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    assert chat(client, messages=_image_message(png_data_url()), max_tokens=2).status_code == 200


def test_without_a_chat_template_chat_is_a_clear_400_and_completions_work(make_client, bundles):
    engine = Engine(read_bundle(bundles.text_only))
    engine.tokenizer.chat_template = None
    client = make_client(engine, bundle=str(bundles.text_only), model_name=MODEL)
    assert_error(chat(client), 400, "no_chat_template")
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 2, "temperature": 0}
    assert client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]["text"] == " brown fox"
