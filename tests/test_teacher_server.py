"""teacher=server: the top-k cache filled over HTTP equals the in-process cache, survives a killed server, and a
wrong teacher is refused with one line before any heavy work.

Most tests run our server (a real uvicorn on 127.0.0.1) over the serving tests' micro decoder, so they take
seconds; the equality with the SmolLM2 teacher, through the recipe, is the one that loads a real teacher.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from datasets import Dataset

from autoglm_train.distill.teacher_client import ServerTeacherSpec, TeacherMismatchError, TeacherServer
from autoglm_train.distill.teacher_wire import TeacherServerError, parse_topk, topk_request
from autoglm_train.distill.topk_cache import TopKCacheSpec, build_topk_cache, load_topk_cache, write_topk_cache
from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.local import running_server
from tests.conftest import REPO
from tests.serve_support import one_thread

K = 8
Mismatch = TeacherMismatchError


@pytest.fixture(scope="module")
def micro_engine(bundles):
    return Engine(read_bundle(bundles.text_only))


@pytest.fixture(scope="module")
def micro_url(micro_engine, bundles):
    config = ServerConfig(bundle=str(bundles.text_only), no_auth=True, rate_limit=None)
    with running_server(create_app(config, micro_engine)) as url:
        yield url + "/v1"


def _blocks(n: int, seq: int, vocab: int, seed: int = 0) -> Dataset:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(n, seq + 1))
    return Dataset.from_dict({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}).with_format("numpy")


def _spec(url: str, **overrides) -> ServerTeacherSpec:
    return ServerTeacherSpec(url=url, **{"top_k": K, "concurrency": 4, "retries": 0, "backoff_s": 0.0, **overrides})


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- the wire shape, against a real server ----------------------------------------------------------------------
@pytest.mark.parametrize("form", ["echo", "prompt_logprobs"])
def test_request_shape_and_ids_match_the_model_in_process(micro_url, micro_engine, student_tok, form):
    ids = list(range(100, 112))
    body = topk_request("text-only", ids, K, form)
    choice = httpx.post(micro_url + "/completions", json=body, timeout=60).json()["choices"][0]
    tops = choice["logprobs"]["top_logprobs"]
    if form == "echo":
        assert choice["logprobs"]["tokens"][: len(ids)] == [f"token_id:{i}" for i in ids]  # echoed as ids
        assert tops[0] is None and len(tops) == len(ids) + 1  # prompt positions, then the one generated token
        assert all(key.startswith("token_id:") for key in tops[1])
    else:
        prompt = choice["prompt_logprobs"]
        assert prompt[0] is None and len(prompt) == len(ids) and len(tops) == 1
        assert {"logprob", "rank", "decoded_token"} <= set(next(iter(prompt[1].values())))
    got_ids, got_lp = parse_topk(choice, len(ids), K, form)
    with one_thread(), torch.no_grad():
        logits = micro_engine.decoder(torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits[:, : len(student_tok)], -1).topk(K, -1)  # padded rows are no tokens
    assert np.array_equal(got_ids, want.indices.numpy())  # row t: the top-k after token t (the cache's alignment)
    np.testing.assert_allclose(got_lp, want.values.numpy(), atol=1e-5)


def test_cache_through_the_server_equals_the_in_process_cache(micro_url, micro_engine, student_tok, tmp_path):
    vocab = len(student_tok)
    train = _blocks(12, 16, vocab)
    spec = TopKCacheSpec(enabled=True, k=K, shard_blocks=5)
    with one_thread():
        want = build_topk_cache(micro_engine.decoder, train, tmp_path / "local", spec, vocab).with_format("numpy")[:]
    with TeacherServer(_spec(micro_url)) as server:
        identity = server.preflight(student_tok, vocab)
        got = write_topk_cache(server.score, train, tmp_path / "http", spec, vocab, identity.teacher_id)
        assert server.stats["tokens"] == 12 * 16 and server.stats["retries"] == 0
    got = got.with_format("numpy")[:]
    assert np.array_equal(got["topk_ids"], want["topk_ids"])
    assert np.array_equal(got["topk_logprobs"], want["topk_logprobs"])
    meta = json.loads((tmp_path / "http" / "meta.json").read_text())
    assert meta["teacher"] == identity.teacher_id == f"server:text-only:{identity.fingerprint}"
    with pytest.raises(ValueError, match="refusing to reuse"):  # a cache of another teacher is never reused
        write_topk_cache(server.score, train, tmp_path / "http", spec, vocab, "server:other:0123")


# --- refusals, one line each ------------------------------------------------------------------------------------
def test_top_k_above_the_servers_max_logprobs_is_refused(micro_engine, bundles, student_tok):
    config = ServerConfig(bundle=str(bundles.text_only), no_auth=True, rate_limit=None, max_logprobs=4)
    app = create_app(config, micro_engine)
    with running_server(app) as url, TeacherServer(_spec(url + "/v1")) as server, pytest.raises(Mismatch) as err:
        server.preflight(student_tok, len(student_tok))
    message = _one_line(err)
    assert "teacher.top_k=8" in message and "max allowed: 4" in message and "--max-logprobs 8" in message


def test_the_recipe_refuses_before_packing_any_data(micro_engine, bundles, tmp_path):
    """``recipe=distill teacher=server`` against a server allowing 4 log-probs, k=8: one line, no data packed."""
    from hydra import compose, initialize_config_dir

    from recipes.distill import run

    config = ServerConfig(bundle=str(bundles.text_only), no_auth=True, rate_limit=None, max_logprobs=4)
    with running_server(create_app(config, micro_engine)) as url:
        overrides = [
            "recipe=distill",
            "teacher=server",
            f"teacher.url={url}/v1",
            f"teacher.tokenizer={bundles.text_only}",
        ]
        overrides += ["recipe.teacher_cache.k=8", f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        with pytest.raises(Mismatch) as err:
            run(cfg)
    assert "teacher.top_k=8" in _one_line(err) and not (tmp_path / "cache").exists()


def test_a_server_with_another_tokenizer_is_refused(bundles, student_tok, tmp_path):
    """Same weights and vocabulary size, two tokens' ids swapped: a tokenizer of another version or family."""
    decoder = tmp_path / "other-tokenizer"
    shutil.copytree(bundles.text_only, decoder)
    tokenizer = json.loads((decoder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["Ġquick"], vocab["Ġbrown"] = vocab["Ġbrown"], vocab["Ġquick"]
    (decoder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = ServerConfig(bundle=str(decoder), no_auth=True, rate_limit=None)
    app = create_app(config)
    with running_server(app) as url, TeacherServer(_spec(url + "/v1")) as server, pytest.raises(Mismatch) as err:
        server.preflight(student_tok, len(student_tok))
    assert "tokenizes the probe differently" in _one_line(err)


def test_a_server_with_a_smaller_vocabulary_is_refused(micro_url, student_tok):
    ours = copy.deepcopy(student_tok)
    ours.add_tokens(["<only-on-our-side>"])
    with TeacherServer(_spec(micro_url)) as server, pytest.raises(TeacherMismatchError) as err:
        server.preflight(ours, len(ours))
    message = _one_line(err)
    assert f"accepts token ids 0..{len(student_tok) - 1}" in message and f"has {len(ours)} tokens" in message


def test_a_server_without_prompt_logprobs_is_refused():
    """What transformers serve answers: text, no logprobs (it ignores echo and logprobs)."""
    answer = {"choices": [{"index": 0, "text": " with", "finish_reason": "length"}]}
    with pytest.raises(TeacherServerError) as err:
        parse_topk(answer["choices"][0], 4, K)
    assert "without prompt log-probs" in _one_line(err)


def test_decoder_flag_serves_any_causal_lm_directory(bundles, tmp_path, capsys):
    from autoglm_train.serve.cli import config_from_args, parse_args

    args = ["--decoder", str(bundles.text_only), "--no-auth", "--max-logprobs", "32"]
    config = config_from_args(parse_args(args))
    assert config.bundle == str(bundles.text_only) and config.max_logprobs == 32
    with pytest.raises(ValueError, match=r"no config\.json"):
        config_from_args(parse_args(["--decoder", str(tmp_path), "--no-auth"]))
    with pytest.raises(SystemExit):
        parse_args(["--bundle", "a", "--decoder", "b"])
    assert "not allowed with argument" in capsys.readouterr().err


# --- the vLLM shape itself ------------------------------------------------------------------------------------------
def test_vllm_answers_are_read_by_token_id_best_k_first():
    """vLLM adds the scored token to an entry when it is outside the top-k (k+1 entries); keys are token ids."""
    echo = {
        "logprobs": {
            "tokens": ["token_id:5", "token_id:7", "token_id:9"],
            "top_logprobs": [
                None,
                {"token_id:7": -3.0, "token_id:1": -0.5, "token_id:2": -1.0},  # 7 was the prompt token, rank 3
                {"token_id:4": -0.1, "token_id:9": -2.5},
            ],
        }
    }
    ids, logprobs = parse_topk(echo, 2, 2)
    assert ids.tolist() == [[1, 2], [4, 9]] and logprobs.tolist() == [[-0.5, -1.0], [-0.1, -2.5]]
    prompt_form = {
        "prompt_logprobs": [None, {"7": {"logprob": -3.0, "rank": 3}, "1": {"logprob": -0.5, "rank": 1}}],
        "logprobs": {"top_logprobs": [{"token_id:4": -0.1}]},
    }
    assert parse_topk(prompt_form, 2, 1, "prompt_logprobs")[0].tolist() == [[1], [4]]
    with pytest.raises(TeacherServerError, match="return_tokens_as_token_ids"):
        parse_topk({"logprobs": {"top_logprobs": [None, {" the": -1.0}]}}, 1, 1)


def test_failed_requests_are_retried_with_backoff_and_4xx_are_not():
    answers = iter([httpx.Response(503), httpx.Response(429), httpx.ConnectError("refused")])

    def handler(request: httpx.Request) -> httpx.Response:
        nxt = next(answers, None)
        if isinstance(nxt, Exception):
            raise nxt
        return nxt or httpx.Response(200, json={"data": [{"id": "m"}]})

    spec = _spec("http://teacher:8000/v1", retries=3)
    with TeacherServer(spec, transport=httpx.MockTransport(handler)) as server:
        assert server.served_model() == "m" and server.stats["retries"] == 3
    refused = httpx.MockTransport(lambda request: httpx.Response(400, json={"error": {"message": "bad"}}))
    with TeacherServer(spec, transport=refused) as server, pytest.raises(TeacherServerError, match="refused a block"):
        server.model = "m"
        server.score_block([1, 2, 3])
    assert server.stats["retries"] == 0
    down = httpx.MockTransport(lambda request: httpx.Response(502))
    server = TeacherServer(_spec("http://teacher:8000/v1", retries=2), transport=down)
    with server, pytest.raises(TeacherServerError) as err:
        server.served_model()
    assert "unreachable after 3 tries (HTTP 502" in _one_line(err) and "rerun to resume" in str(err.value)


# --- a server killed mid-build -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(decoder: Path, port: int, log: Path) -> subprocess.Popen:
    """``python -m autoglm_train.serve --decoder DIR``, the documented command, ready when /health answers."""
    cmd = [sys.executable, "-m", "autoglm_train.serve", "--decoder", str(decoder), "--port", str(port)]
    cmd += ["--no-auth", "--rate-limit", "none", "--threads", "1", "--log-level", "warning"]
    with open(log, "a") as out:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not start: {log.read_text()[-3000:]}")


def test_killed_server_loses_nothing_the_build_resumes(bundles, micro_engine, student_tok, tmp_path):
    """SIGKILL the server after the first shard: the build fails with one line, keeping that shard; a rerun started
    while the server is still down retries until it is back, then writes only the missing shards."""
    vocab = len(student_tok)
    train = _blocks(16, 16, vocab, seed=1)
    spec = TopKCacheSpec(enabled=True, k=K, shard_blocks=4)
    with one_thread():
        want = build_topk_cache(micro_engine.decoder, train, tmp_path / "local", spec, vocab).with_format("numpy")[:]
    port, log = _free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}/v1"
    process = _start_server(bundles.text_only, port, log)
    try:
        with TeacherServer(_spec(url, retries=1)) as server:
            teacher_id = server.preflight(student_tok, vocab).teacher_id
            calls = []

            def killing_scorer(blocks):
                calls.append(len(blocks))
                if len(calls) == 2:  # the server dies between two shards
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                return server.score(blocks)

            with pytest.raises(TeacherServerError) as err:
                write_topk_cache(killing_scorer, train, tmp_path / "http", spec, vocab, teacher_id)
        assert "unreachable after 2 tries" in _one_line(err)
        first = tmp_path / "http" / "shard-00000"
        stamp = first.stat().st_mtime_ns
        assert sorted(p.name for p in (tmp_path / "http").iterdir() if p.name.startswith("shard")) == [first.name]

        result = {}
        patient = TeacherServer(_spec(url, retries=8, backoff_s=0.5))
        build = threading.Thread(
            target=lambda: result.update(
                cache=write_topk_cache(patient.score, train, tmp_path / "http", spec, vocab, teacher_id)
            )
        )
        build.start()  # the server is still down: the requests retry
        time.sleep(1.0)
        process = _start_server(bundles.text_only, port, log)
        build.join(timeout=180)
        patient.close()
        assert "cache" in result and patient.stats["retries"] >= 1
    finally:
        process.kill()
        process.wait()
    assert first.stat().st_mtime_ns == stamp  # the shard finished before the kill was kept, not redone
    got = load_topk_cache(tmp_path / "http").with_format("numpy")[:]
    assert np.array_equal(got["topk_ids"], want["topk_ids"])
    assert np.array_equal(got["topk_logprobs"], want["topk_logprobs"])


# --- the real teacher, through the recipe ---------------------------------------------------------------------------
def test_smollm2_behind_our_server_gives_the_in_process_cache_and_loss_curve(teacher_spec, tmp_path):
    """recipe=distill twice, top-k cache on: the SmolLM2 teacher in process, then the same teacher behind
    ``autoglm_train.serve`` on 127.0.0.1 (``teacher=server``). Same cache (ids exact, log-probs within 1e-4), same
    training losses (1e-5)."""
    from hydra import compose, initialize_config_dir

    from autoglm_train.distill.teacher import teacher_dir
    from recipes.distill import run
    from tests.conftest import CACHE
    from tests.micro_distill import MICRO_SHAPE, write_micro_corpus

    corpus = write_micro_corpus(tmp_path / "corpus.jsonl")

    def distill(name: str, *extra: str) -> tuple[dict, dict[int, float]]:
        losses = tmp_path / f"{name}.jsonl"
        overrides = [
            "recipe=distill",
            *MICRO_SHAPE,
            f"data.source={corpus}",
            "data.max_train_blocks=64",
            "trainer.max_steps=4",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "recipe.checkpoint_every_n_steps=0",
            "recipe.sample_max_new_tokens=1",
            "recipe.teacher_cache.k=8",
            "recipe.teacher_cache.shard_blocks=32",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"run_name={name}",
            f"+callbacks=[{{_target_: tests.faults.LossRecorder, path: {losses}}}]",
            *extra,
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            summary = run(compose(config_name="train", overrides=overrides))
        rows = [json.loads(line) for line in losses.read_text().splitlines()]
        return summary, {row["step"]: row["loss"] for row in rows}

    local, local_losses = distill(
        "local", "recipe.teacher_cache.enabled=true", f"teacher.cache_dir={CACHE / 'teachers'}"
    )
    smollm2 = teacher_dir(teacher_spec)
    config = ServerConfig(bundle=smollm2, no_auth=True, rate_limit=None, max_logprobs=8)
    with running_server(create_app(config)) as url:
        remote, remote_losses = distill(
            "remote", "teacher=server", f"teacher.url={url}/v1", f"teacher.tokenizer={smollm2}"
        )

    caches = {
        json.loads(m.read_text())["teacher"]: m.parent for m in (tmp_path / "cache").glob("teacher_topk/*/meta.json")
    }
    server_id = next(t for t in caches if t.startswith("server:"))
    assert remote["teacher"] == server_id and len(caches) == 2  # each teacher its own cache (key and meta.json)
    want = load_topk_cache(caches[local["teacher"]]).with_format("numpy")[:]
    got = load_topk_cache(caches[server_id]).with_format("numpy")[:]
    assert len(got["topk_ids"]) == 64 and got["topk_ids"].shape[1:] == (32, 8)  # blocks x 32 tokens x k
    assert int((got["topk_ids"] != want["topk_ids"]).sum()) == 0
    delta = np.abs(got["topk_logprobs"].astype(np.float32) - want["topk_logprobs"].astype(np.float32)).max()
    loss_delta = max(abs(remote_losses[s] - local_losses[s]) for s in local_losses)
    print(f"SmolLM2 via server: {len(got['topk_ids'])} blocks, max |d logprob| {delta}, loss max diff {loss_delta}")
    assert delta <= 1e-4, delta
    assert sorted(remote_losses) == sorted(local_losses) == [1, 2, 3, 4]
    assert loss_delta <= 1e-5
    assert "val/loss" in remote and "val/teacher_top1_agreement" not in remote  # no teacher here: the student's CE
