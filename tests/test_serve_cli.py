"""The server's command line: argument handling in-process, and one real start-up as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.serve.app import create_app
from autoglm_train.serve.cli import config_from_args, log_startup, parse_args, startup_lines
from tests.conftest import REPO
from tests.serve_support import KEY, MODEL


def test_keys_come_from_flags_env_and_file(tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("from-file\n\n")
    monkeypatch.setenv("AUTOGLM_API_KEY", "env-a, env-b")
    config = config_from_args(parse_args(["--bundle", "b", "--api-key", "flag", "--api-key-file", str(keys)]))
    assert config.api_keys == ["flag", "env-a", "env-b", "from-file"] and not config.no_auth
    monkeypatch.delenv("AUTOGLM_API_KEY")
    assert config_from_args(parse_args(["--bundle", "b", "--api-key", "EMPTY"])).no_auth
    assert config_from_args(parse_args(["--bundle", "b", "--no-auth", "--rate-limit", "none"])).rate_limit is None
    with pytest.raises(ValueError, match="no API key configured"):
        config_from_args(parse_args(["--bundle", "b"]))


def test_startup_lines_say_which_module_sits_where(bundles):
    config = config_from_args(parse_args(["--bundle", str(bundles.full), "--api-key", KEY]))
    app = create_app(config, Engine(read_bundle(bundles.full)))
    text = "\n".join(startup_lines(config, app))
    assert f"as model '{MODEL}'" in text
    assert "text decoder: GlmForCausalLM" in text and "float32) on cpu" in text
    assert "vision plugin" in text and "speech plugin" in text and "on demand" in text
    assert "1 API key(s) [key-" in text and KEY not in text  # keys are never logged


@pytest.mark.slow
def test_python_m_serve_starts_logs_and_answers(bundles):
    """The documented command, end to end: start-up log, ready line, an authenticated request."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "autoglm_train.serve", "--bundle", str(bundles.full), "--port", str(port)]
    env = {**os.environ, "AUTOGLM_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    log = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            log.append(line)
            if "ready: http://" in line:
                break
        text = "".join(log)
        assert f"ready: http://127.0.0.1:{port}/v1" in text, text
        assert "text decoder" in text and "vision plugin" in text
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert response.json()["data"][0]["id"] == MODEL
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_cli_refuses_to_start_without_an_auth_choice(bundles):
    result = subprocess.run(
        [sys.executable, "-m", "autoglm_train.serve", "--bundle", str(bundles.full), "--port", "1"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "AUTOGLM_API_KEY"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "no API key configured" in result.stderr and "--no-auth" in result.stderr


def test_no_auth_mode_is_logged_loudly(bundles, caplog):
    config = config_from_args(parse_args(["--bundle", str(bundles.full), "--api-key", "EMPTY"]))
    app = create_app(config, Engine(read_bundle(bundles.full)))
    with caplog.at_level("INFO", logger="autoglm_train.serve"):
        log_startup(config, app)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("NO AUTHENTICATION" in w for w in warnings)
    assert any("auth: NONE" in r.getMessage() for r in caplog.records)
