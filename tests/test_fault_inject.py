"""SIGKILL inside every step of the checkpoint writer, and the fault-injection script on a real distill run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoglm_train.utils.checkpoint_io import (
    FAULT_POINTS,
    SCRATCH_RE,
    SafetensorsCheckpointIO,
    set_fault_hook,
)
from autoglm_train.utils.resume import find_last_checkpoint, resolve_ckpt_path
from tests.conftest import REPO


def _ckpt(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def _killed_in_child(point: str, action) -> None:
    """Run ``action`` in a forked child that SIGKILLs itself at ``point`` of the real writer; assert it died there."""
    pid = os.fork()
    if pid == 0:  # child: no pytest teardown, no atexit, exactly like a killed trainer
        set_fault_hook(lambda at, path: os.kill(os.getpid(), signal.SIGKILL) if at == point else None)
        try:
            action()
        finally:
            os._exit(3)  # reached only if the fault point never fired
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point}: child exited {status}"


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_sigkill_at_every_point_of_a_save_or_removal_loses_nothing(tmp_path: Path, point: str) -> None:
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(_ckpt(1), tmp_path / "step=1.ckpt")
    io.save_checkpoint(_ckpt(2), tmp_path / "last.ckpt")
    if point == "removing":
        _killed_in_child(point, lambda: io.remove_checkpoint(tmp_path / "step=1.ckpt"))
    elif point == "old_moved_aside":
        _killed_in_child(point, lambda: io.save_checkpoint(_ckpt(3), tmp_path / "last.ckpt"))
    else:
        _killed_in_child(point, lambda: io.save_checkpoint(_ckpt(3), tmp_path / "step=3.ckpt"))
    scratch = [p.name for p in tmp_path.iterdir() if SCRATCH_RE.match(p.name)]
    assert scratch, "the kill left a half-done write behind"

    # the newest complete state is step 2, wherever the kill left it; the interrupted write is never picked
    found = find_last_checkpoint(tmp_path)
    assert io.load_checkpoint(found)["global_step"] == 2
    resumed = resolve_ckpt_path("last", tmp_path)
    assert io.load_checkpoint(resumed)["global_step"] == 2
    torch.testing.assert_close(io.load_checkpoint(resumed)["state_dict"]["w"], torch.full((64, 64), 2.0))
    left = [p.name for p in tmp_path.iterdir() if (m := SCRATCH_RE.match(p.name)) and m["kind"] != "old"]
    assert left == [], "resume removes interrupted writes before the run saves again"
    if point == "old_moved_aside":  # the previous last.ckpt, moved aside, is the state to resume from: kept
        assert ".last.ckpt.old-" in Path(resumed).name


def _fault_inject(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "benchmarks/fault_inject.py", "--no-write", "--json", str(out), *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


def test_fault_inject_kill_inside_a_checkpoint_write_then_resume(tmp_path: Path) -> None:
    """CI size: one uninterrupted reference run, one run killed inside a checkpoint write, one resumed run."""
    result = _fault_inject(tmp_path, "--trials", "1", "--faults", "1", "--kinds", "ckpt", "--steps", "5")
    assert result["problems"] == []
    assert result["kills_by_kind"]["ckpt"] == 1 and result["resumes"] == 1
    assert result["max_loss_diff"] <= 1e-5 and result["max_weight_diff"] <= 1e-6


@pytest.mark.slow
def test_fault_inject_many_kills_of_every_kind(tmp_path: Path) -> None:
    result = _fault_inject(tmp_path, "--trials", "3", "--faults", "3", "--seed", "7")
    assert result["problems"] == [] and result["trials"] == 3
    assert result["kills"] >= 6
