"""A real uvicorn on 127.0.0.1 driven by the real clients: openai, langchain_openai, raw httpx streams."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import openai
import pytest

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.local import running_server
from tests.serve_support import (
    ANSWER,
    KEY,
    MODEL,
    QUESTION,
    REASONING,
    SENTENCE,
    one_thread,
    png_data_url,
    wav_base64,
)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def server(bundles):
    """(base URL, app) of a live server; one per module, stopped at the end."""
    app = create_app(
        ServerConfig(bundle=str(bundles.full), api_keys=[KEY], rate_limit=None), Engine(read_bundle(bundles.full))
    )
    with running_server(app) as url:
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_openai_client_chat_non_stream_with_thinking(client):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, extra_body={"return_reasoning": True}
    )
    message = response.choices[0].message
    assert message.content == ANSWER and message.model_extra["reasoning_content"] == REASONING
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens > 0


def test_openai_client_chat_stream(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"enable_thinking": True, "return_reasoning": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert (reasoning, content) == (REASONING, ANSWER)
    assert chunks[-1].usage.completion_tokens > 0


def test_openai_client_image_request(client, server):
    content = [{"type": "text", "text": "Which digit?"}, {"type": "image_url", "image_url": {"url": png_data_url()}}]
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=3
    )
    assert response.choices[0].finish_reason in ("stop", "length")
    assert server[1].state.server.engine.loaded_modules()["vision"] == "cpu"
    with pytest.raises(openai.BadRequestError, match="not fetched by this server") as err:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}
            ],
        )
    assert err.value.code == "unsupported_image_url"


def test_openai_client_completions_with_logprobs(client):
    response = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = response.choices[0]
    assert choice.text == "The quick brown fox jumps over the lazy"
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == 3 + 5
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])


def test_openai_client_errors(server):
    bad = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="gpt-4", messages=QUESTION
        )


def test_langchain_chat_openai_streaming_with_thinking(server):
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=f"{server[0]}/v1",
        api_key=KEY,
        streaming=True,
        temperature=0,
        max_tokens=40,
        max_retries=0,
        extra_body={"enable_thinking": True, "return_reasoning": True},
    )
    pieces = [chunk.content for chunk in llm.stream("What is two plus two?")]
    assert "".join(pieces) == ANSWER and len([p for p in pieces if p]) > 1
    assert llm.invoke("What is two plus two?").content == ANSWER


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(server, stream):
    url, app = server
    state = app.state.server
    before = state.metrics.cancelled
    body = {"model": MODEL, "prompt": SENTENCE, "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
                lines = r.iter_lines()
                assert [next(lines) for _ in range(3)]  # generation is under way; leaving closes the connection
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up mid-generation
                http.post(f"{url}/v1/completions", json=body, headers=headers, timeout=0.5)
    deadline = time.monotonic() + 10
    while state.metrics.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.metrics.cancelled == before + 1
    time.sleep(0.2)  # the worker thread notices the flag before its next token
    steps = state.engine.decode_steps
    time.sleep(0.5)
    assert state.engine.decode_steps == steps < 3000  # the token loop has stopped, well short of max_tokens


def test_fifty_concurrent_streams_complete_without_errors(server):
    url, _ = server

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 6, "temperature": 0, "stream": True}
        text = []
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                elif line == "data: [DONE]":
                    return "".join(text)
        raise AssertionError(f"stream {i} ended without [DONE]")

    async def all_of_them() -> list[str]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(timeout=60, headers=headers, limits=httpx.Limits(max_connections=50)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(50)))

    texts = asyncio.run(all_of_them())
    assert texts == [" brown fox jumps over the lazy"] * 50


def test_eval_tool_reports_perplexity_agreement_digits_and_wer(server, tmp_path, capsys):
    from autoglm_train.eval.client import main

    (tmp_path / "heldout.txt").write_text(f"{SENTENCE}\n\nThe quick brown dog.\n")
    for i in range(2):
        (tmp_path / f"d{i}.png").write_bytes(base64.b64decode(png_data_url(seed=i).split(",", 1)[1]))
    (tmp_path / "digits.jsonl").write_text(
        "".join(json.dumps({"image": f"d{i}.png", "label": str(i)}) + "\n" for i in range(2))
    )
    (tmp_path / "a.wav").write_bytes(base64.b64decode(wav_base64()))
    (tmp_path / "speech.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "four"}) + "\n")
    url = f"{server[0]}/v1"
    args = ["--base-url", url, "--api-key", KEY, "--text", str(tmp_path / "heldout.txt"), "--teacher-url", url]
    args += ["--images", str(tmp_path / "digits.jsonl"), "--audio", str(tmp_path / "speech.jsonl"), "--max-tokens", "4"]
    main([*args, "--json", str(tmp_path / "report.json")])
    table = capsys.readouterr().out
    for name in ("text/perplexity", "text/teacher_top1_agreement", "vision/digit_accuracy", "speech/wer"):
        assert name in table
    metrics = json.loads((tmp_path / "report.json").read_text())["metrics"]
    assert 1.0 <= metrics["text/perplexity"] < 100  # the memorised sentence is near-certain
    assert metrics["text/teacher_top1_agreement"] == 1.0  # the server against itself
    # the scores are the project's metrics over what the server answers to the same requests, one per item
    from autoglm_train.eval.client import DIGIT_PROMPT, SPEECH_PROMPT
    from autoglm_train.eval.text_metrics import digit_accuracy, wer

    asker = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)

    def answer(part: dict, max_tokens: int) -> str:
        content = [{"type": "text", "text": SPEECH_PROMPT if part["type"] == "input_audio" else DIGIT_PROMPT}, part]
        messages = [{"role": "user", "content": content}]
        extra = {"enable_thinking": False}
        reply = asker.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        return reply.choices[0].message.content

    seen = [answer({"type": "image_url", "image_url": {"url": png_data_url(seed=i)}}, 8) for i in range(2)]
    heard = answer({"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}}, 4)
    counts = json.loads((tmp_path / "report.json").read_text())["counts"]
    assert counts["vision/digit_accuracy"] == 2 and counts["speech/wer"] == 1
    # the micro model names no digit, and babbles one word (no spaces) for the one reference word
    assert metrics["vision/digit_accuracy"] == digit_accuracy(["0", "1"], seen) == 0.0
    assert len(heard.split()) == 1 and metrics["speech/wer"] == wer(["four"], [heard]) == 1.0
