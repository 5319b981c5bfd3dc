"""``python -m autoglm_train.pipeline --quick`` end to end: a stage failing, then the rerun that finishes the job.

Every stage runs for real (train.py, the exporter, uvicorn on a free port, the evaluation client);
about 1.5 minutes on 2 idle CPU cores (4 with other jobs on them), hence ``slow`` (``make test-all``).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm_train.pipeline.report import fmt
from tests.conftest import REPO
from tests.pipeline_support import check_report_cells

pytestmark = pytest.mark.slow


def _pipeline(root: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autoglm_train.pipeline", "--quick", "--out", str(root), "--quiet", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)


def _refuses_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_quick_pipeline_fails_clearly_then_resumes_to_an_evaluated_bundle_and_report(tmp_path):
    root = tmp_path / "demo"
    failed = _pipeline(root, "--override", "speech:recipe.stage=bogus")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "stage 'speech' failed" in failed.stderr and str(root / "logs" / "speech.log") in failed.stderr
    kept = [
        "distill/run_summary.json",
        "distill/student_int8/model.safetensors",
        "eval/compare.json",
        "vision/run_summary.json",
    ]
    assert all((root / rel).is_file() for rel in kept)
    assert not (root / "bundle").exists()

    done = _pipeline(root)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("distill", "compare", "vision"):
        assert re.search(rf"\[\d/8 {name}\] complete already", done.stdout), done.stdout

    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    assert set(manifest["modules"]["plugins"]) == {"vision", "speech"} and manifest["parity"]["passed"]
    served = json.loads((root / "eval" / "server.json").read_text())["metrics"]
    for key in ("text/perplexity", "text/teacher_top1_agreement", "vision/digit_accuracy", "speech/wer"):
        assert served.get(key) is not None, key
    for key in ("chat/kl_to_teacher", "chat/non_degenerate_english", "verifiable/accuracy_thinking_on"):
        assert served.get(key) is not None, key  # the assistant, judged on the held-out chat and verifiable sets
    port = int(re.search(r"ready: http://127.0.0.1:(\d+)/v1", (root / "logs" / "server.log").read_text()).group(1))
    assert _refuses_connections(port)  # the server was stopped

    report = (root / "report" / "report.md").read_text()
    vision, speech = (json.loads((root / p / "run_summary.json").read_text()) for p in ("vision", "speech"))
    assert f"| held-out WER | {fmt(vision['test/wer'])} | {fmt(speech['test/wer'])} |" in report
    assert f"| gate (mean over held-out) | {fmt(vision['test/gate_vision'])} | {fmt(speech['test/gate_speech'])} |" in (
        report
    )
    assert "## The assistant, through the server" in report and "| chat/kl_to_teacher |" in report
    assert check_report_cells(root) >= 40
    assert {"distill.png", "plugins.png", "report.html", "report.json"} <= {p.name for p in (root / "report").iterdir()}

    again = _pipeline(root)
    assert again.returncode == 0 and again.stdout.count("complete already") == 7, again.stdout
