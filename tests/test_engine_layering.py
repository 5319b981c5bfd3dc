"""The engine knows no HTTP: loading a bundle and generating with it imports no web framework (issue 26).

The import-linter contract (``make lint``) keeps ``autoglm_train.engine`` from importing ``serve``; this checks
what actually gets imported at run time, third-party modules included, in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

WEB = ("fastapi", "starlette", "uvicorn", "sse_starlette")

SCRIPT = """
import json, sys, threading
import torch
torch.set_num_threads(1)
import autoglm_train.engine
from autoglm_train.engine import Engine, Prompt, SamplingParams, read_bundle

engine = Engine(read_bundle(sys.argv[1]), device="cpu")
prompt = Prompt(ids=engine.encode("The quick brown fox", add_special_tokens=False))
greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
tokens = engine.generate([prompt], greedy)
streamed = [e.token_ids for e in engine.stream(prompt, greedy, threading.Event())]
print("RESULT " + json.dumps({
    "tokens": tokens,
    "streamed": sum(streamed, []),
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in {web} or m.startswith("autoglm_train.serve")),
}))
"""


def test_engine_generates_without_importing_a_web_framework(bundles):
    script = SCRIPT.replace("{web}", repr(set(WEB)))
    done = subprocess.run(
        [sys.executable, "-c", script, str(bundles.full)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result line: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert len(result["tokens"]) == 1 and len(result["tokens"][0]) == 4  # a real generation ran
    assert result["streamed"] == result["tokens"][0], result  # the same loop, driven from its own thread
    assert result["modules"] == [], f"the engine imported HTTP modules: {result['modules']}"
