"""Batched generation: requests decoded together give the tokens they get one at a time (greedy), text and media."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Delta, Engine, Prompt
from autoglm_train.engine.sampling import SamplingParams
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.multimodal import decode_audio, decode_image
from tests.serve_support import KEY, MODEL, SENTENCE, one_thread, png_data_url, wav_base64


@pytest.fixture(scope="module")
def engine(bundles):
    with one_thread():
        yield Engine(read_bundle(bundles.full))


def _prompts(engine: Engine) -> list[Prompt]:
    """Texts of different lengths, and chat prompts carrying an image or a clip (their prefill goes through fusion)."""
    texts = ["The quick brown fox", "The", SENTENCE, "Two plus two is"]
    prompts = [Prompt(ids=engine.encode(t)) for t in texts]
    for seed in range(2):
        image = decode_image(png_data_url(seed), "image", 10**6)
        messages = [{"role": "user", "content": "What is this?" + "<|image|>" * 4}]
        ids = engine.encode(engine.render_chat(messages, {}), add_special_tokens=False)
        prompts.append(Prompt(ids=ids, inputs=engine.modality_inputs({"vision": [image]})))
        audio = decode_audio(wav_base64(seed=seed), "wav", "audio")
        messages = [{"role": "user", "content": "<|audio|>" * 4 + "Transcribe."}]
        ids = engine.encode(engine.render_chat(messages, {}), add_special_tokens=False)
        prompts.append(Prompt(ids=ids, inputs=engine.modality_inputs({"speech": [audio]})))
    return prompts


def _greedy(budget: int) -> SamplingParams:
    return SamplingParams(max_tokens=budget, temperature=0.0, ignore_eos=True)


def _tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, Delta) for t in e.token_ids]


def test_batched_greedy_tokens_equal_one_at_a_time(engine):
    prompts = _prompts(engine)
    params = _greedy(12)
    with one_thread():
        alone = [_tokens(engine.stream(p, params, threading.Event())) for p in prompts]
        before = engine.scheduler.peak_batch
        together = engine.generate(prompts, params)
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert engine.scheduler.peak_batch == len(prompts) > before == 1  # decoded as one batch, not in turn


def test_requests_join_a_running_batch_and_leave_it(engine):
    """Sequences of different lengths: short ones leave, later ones join between steps; each equals its solo run."""
    prompts = _prompts(engine)
    budgets = [3, 20, 7, 1, 15, 5, 9, 2]
    with one_thread():
        alone = [
            _tokens(engine.stream(p, _greedy(b), threading.Event())) for p, b in zip(prompts, budgets, strict=True)
        ]
        results: list[list[int]] = [[] for _ in prompts]
        cancel = threading.Event()
        first = [(p, _greedy(b)) for p, b in zip(prompts[:4], budgets[:4], strict=True)]
        late = [(p, _greedy(b)) for p, b in zip(prompts[4:], budgets[4:], strict=True)]

        def run(jobs, offset):
            for index, event in engine.stream_many(jobs, cancel):
                if isinstance(event, Delta):
                    results[offset + index] += event.token_ids

        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(run, first, 0)
            b = pool.submit(run, late, 4)
            a.result(timeout=120), b.result(timeout=120)
    assert results == alone


def test_concurrent_http_requests_share_decode_steps(bundles):
    """8 concurrent /v1/completions clients: fewer decode steps than 8 solo runs, same texts."""
    with one_thread():
        engine = Engine(read_bundle(bundles.full))
        app = create_app(ServerConfig(bundle=str(bundles.full), api_keys=[KEY], rate_limit=None), engine)
        body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        prompts = ["The quick brown fox", "The", SENTENCE, "Two plus two is", "Four", "A", "Jumps over", "Lazy dog"]
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {KEY}"}
            solo = [
                client.post("/v1/completions", headers=headers, json={**body, "prompt": p}).json()["choices"][0]["text"]
                for p in prompts
            ]
            steps = engine.decode_steps
            with ThreadPoolExecutor(len(prompts)) as pool:
                responses = list(
                    pool.map(
                        lambda p: client.post("/v1/completions", headers=headers, json={**body, "prompt": p}), prompts
                    )
                )
            texts = [r.json()["choices"][0]["text"] for r in responses]
            batched_steps = engine.decode_steps - steps
            listed = client.post("/v1/completions", headers=headers, json={**body, "prompt": prompts}).json()
    assert texts == solo
    assert batched_steps < 15 * len(prompts)  # solo: 15 decode steps each
    assert [c["text"] for c in sorted(listed["choices"], key=lambda c: c["index"])] == solo
    assert engine.scheduler.peak_batch > 1


def test_plugins_loaded_on_demand_run_in_eval_mode(bundles):
    """A plugin built at its first request must not run with dropout on (it did: served answers differed)."""
    engine = Engine(read_bundle(bundles.full))
    engine.modality_inputs({"speech": [decode_audio(wav_base64(), "wav", "audio")]})
    plugin = engine.model.plugins["speech"]
    assert not engine.model.training and not plugin.training
    assert not any(m.training for m in plugin.modules())
