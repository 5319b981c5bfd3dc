"""Serve a bundle on a free local port, evaluate it through the API with ``tools/eval_server.py``, stop it.

    python -m autoglm_train.pipeline.serve_eval --bundle B --data D --distill RUN --out server.json

Both sides are the real command lines (``python -m autoglm_train.serve`` under uvicorn, and the
evaluation client) in their own processes; a fresh API key travels through the environment only.
The teacher for next-token agreement is the distill run's teacher, loaded by plain transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

KEY_ENV = "AUTOGLM_API_KEY"  # read by both the server and the evaluation client


def free_port() -> int:
    """A port the OS just called free (the server retries with another if it is taken in between)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(bundle: Path, log: Path, env: dict[str, str], timeout: float = 300.0, tries: int = 3) -> Iterator[str]:
    """A running server for ``bundle``; yields its base URL and stops it (SIGTERM, then SIGKILL) on exit."""
    with open(log, "a", buffering=1) as out:
        for attempt in range(1, tries + 1):
            port = free_port()
            cmd = [sys.executable, "-m", "autoglm_train.serve", "--bundle", str(bundle), "--port", str(port)]
            cmd += ["--rate-limit", "none"]  # the evaluation sends hundreds of requests in a minute
            out.write(f"\n===== {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            base = f"http://127.0.0.1:{port}"
            try:
                if _wait_ready(proc, base, timeout):
                    print(f"server ready at {base}/v1 (pid {proc.pid}, log {log})", flush=True)
                    yield f"{base}/v1"
                    return
            finally:
                _stop(proc)
            if attempt == tries:
                raise RuntimeError(f"the server did not start (exit code {proc.returncode}); see {log}")
            print(f"server exited during start-up (exit code {proc.returncode}); retrying on another port", flush=True)


def _wait_ready(proc: subprocess.Popen, base: str, timeout: float) -> bool:
    """True once /health answers 200; False if the process exits first; TimeoutError after ``timeout``."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return True
        time.sleep(0.5)
    raise TimeoutError(f"the server at {base} was not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def teacher_path(distill_run: Path) -> str:
    """The distill run's teacher as a directory (or hub id) plain transformers loads."""
    from hydra.utils import instantiate

    from autoglm_train.distill.teacher import teacher_dir
    from autoglm_train.eval.heldout_text import run_config

    return teacher_dir(instantiate(run_config(distill_run).teacher))


def _assistant_args(args: argparse.Namespace, data: dict) -> list[str]:
    """The evaluation client's held-out chat / verifiable arguments, where the held-out data has them."""
    cmd = []
    if "chat" in data:
        cmd += ["--chat", str(args.data / data["chat"]["file"]), "--chat-tokens", str(args.chat_tokens)]
    if "verifiable" in data:
        cmd += ["--verifiable", str(args.data / data["verifiable"]["file"])]
        cmd += ["--think-tokens", str(args.think_tokens), "--direct-tokens", str(args.direct_tokens)]
    if cmd:
        cmd += ["--max-prompts", str(max(data.get(k, {}).get("items", 0) for k in ("chat", "verifiable")))]
    return cmd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m autoglm_train.pipeline.serve_eval", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="folder from autoglm_train.pipeline.heldout")
    p.add_argument("--distill", type=Path, help="recipe=distill run whose teacher scores next-token agreement")
    p.add_argument("--out", required=True, type=Path, help="the evaluation's JSON")
    p.add_argument("--server-log", required=True, type=Path)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per transcription")
    p.add_argument("--chat-tokens", type=int, default=48, help="tokens per greedy chat answer")
    p.add_argument("--think-tokens", type=int, default=160, help="tokens per thinking-on verifiable answer")
    p.add_argument("--direct-tokens", type=int, default=24, help="tokens per thinking-off verifiable answer")
    args = p.parse_args(argv)

    data = json.loads((args.data / "manifest.json").read_text())
    tmp = args.out.with_suffix(".tmp.json")
    cmd = [sys.executable, "-m", "autoglm_train.eval.client", "--json", str(tmp)]
    cmd += ["--text", str(args.data / "texts.jsonl"), "--max-texts", str(data["texts"]["items"])]
    if args.distill:
        cmd += ["--teacher", teacher_path(args.distill)]
    if "images" in data:
        cmd += ["--images", str(args.data / "images.jsonl")]
    if "audio" in data:
        cmd += ["--audio", str(args.data / "audio.jsonl"), "--max-tokens", str(args.max_tokens)]
    cmd += ["--max-items", str(max(data.get(k, {}).get("items", 0) for k in ("images", "audio")) or 1)]
    cmd += _assistant_args(args, data)
    env = {**os.environ, KEY_ENV: secrets.token_urlsafe(24)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with serving(args.bundle, args.server_log, env) as base_url:
        print(f"evaluating: {' '.join(cmd)} --base-url {base_url}", flush=True)
        subprocess.run([*cmd, "--base-url", base_url], env=env, check=True)
    os.replace(tmp, args.out)  # only a finished evaluation marks the stage complete


if __name__ == "__main__":
    main()
