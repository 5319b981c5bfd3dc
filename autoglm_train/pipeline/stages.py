"""Run pipeline stages as subprocesses: skip the complete ones, log each to its own file, stop at a failure.

A stage is complete when all its outputs exist; every stage writes its last output atomically
(a summary, a manifest, a renamed directory), so a killed stage never looks complete and a
rerun of the pipeline continues where it stopped. Training stages additionally resume from
their own newest checkpoint. Nothing here deletes a file: logs are appended to, never replaced.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

STATE_FILE = "pipeline.json"
TAIL_LINES = 25


@dataclass
class Stage:
    """One step of the pipeline: a command, what it leaves behind, and where its output goes."""

    name: str
    what: str
    """One line for the plan printout and the report."""
    command: list[str]
    outputs: list[Path]
    """Files whose existence means the stage is complete (its last, atomically written output first)."""
    always: bool = False
    """Run even when the outputs exist (cheap derived outputs, e.g. the report)."""
    cwd: Path | None = None
    """Where the command runs (the checkout: train.py's relative paths and caches resolve there)."""

    def done(self) -> bool:
        return all(p.exists() for p in self.outputs)


class StageFailed(RuntimeError):
    """A stage's command exited non-zero: names the stage, its exit code and its log."""

    def __init__(self, stage: str, returncode: int, log: Path, tail: str) -> None:
        self.stage, self.returncode, self.log = stage, returncode, log
        super().__init__(
            f"stage '{stage}' failed (exit code {returncode}); its log: {log}\n"
            f"--- last lines of {log.name} ---\n{tail}\n---\n"
            "Outputs of the earlier stages are kept; fix the cause and rerun the same command to continue "
            f"from '{stage}'."
        )


def load_state(root: Path) -> dict[str, Any]:
    path = root / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def save_state(root: Path, state: dict[str, Any]) -> None:
    """Atomically, so a kill mid-write leaves the previous state."""
    path = root / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log written)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_stages(
    stages: Sequence[Stage],
    root: Path,
    echo: Callable[[str], None] = print,
    stream: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``stages`` in order under ``root`` (logs in ``root/logs``, state in ``root/pipeline.json``).

    ``options`` (what the command line chose) is recorded in the state for the report. Returns the state.
    Raises :class:`StageFailed` at the first stage that fails; the stages after it do not run and nothing
    produced before it is touched.
    """
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = load_state(root)
    if options is not None:
        state["options"] = options
    for index, stage in enumerate(stages, 1):
        entry = state["stages"].setdefault(stage.name, {})
        label = f"[{index}/{len(stages)} {stage.name}]"
        if stage.done() and not stage.always:
            note = ""
            if entry.get("command") not in (None, stage.command):
                note = " (it ran with a different command; move its outputs aside to redo it)"
            echo(f"{label} complete already ({_rel(stage.outputs[0])}); skipped{note}")
            entry.setdefault("status", "done")
            entry["skipped_at"] = _now()
            save_state(root, state)
            continue
        log = logs / f"{stage.name}.log"
        echo(f"{label} {stage.what}\n    log: {_rel(log)}")
        entry.update(command=stage.command, log=str(log), status="running", started=_now())
        save_state(root, state)
        start, cpu = time.monotonic(), _children_cpu()
        try:
            code = _run(stage, log, sys.stdout if stream else None)
        except KeyboardInterrupt:
            entry.update(status="interrupted", seconds=round(time.monotonic() - start, 1))
            save_state(root, state)
            raise
        entry.update(
            seconds=round(time.monotonic() - start, 1),
            cpu_seconds=round(_children_cpu() - cpu, 1),
            returncode=code,
            finished=_now(),
        )
        if code != 0 or not stage.done():
            entry["status"] = "failed"
            save_state(root, state)
            if code == 0:  # exited cleanly but left its outputs incomplete: still a failure
                missing = [str(p) for p in stage.outputs if not p.exists()]
                with open(log, "a") as f:
                    f.write(f"\npipeline: the command exited 0 but did not write {missing}\n")
            raise StageFailed(stage.name, code, log, tail(log))
        entry["status"] = "done"
        save_state(root, state)
        echo(f"{label} done in {entry['seconds']:.0f} s")
    return state


def _run(stage: Stage, log: Path, console: TextIO | None) -> int:
    """The stage's command with stdout+stderr appended to ``log`` (and echoed to ``console``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines arrive as they are printed
    with open(log, "a", buffering=1) as f:
        f.write(f"\n===== {_now()} {' '.join(stage.command)}\n")
        proc = subprocess.Popen(
            stage.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=stage.cwd,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                if console is not None:
                    console.write(f"    {line}")
        except KeyboardInterrupt:
            proc.wait()  # the child got the same Ctrl-C; let it end cleanly
            raise
        return proc.wait()


def _children_cpu() -> float:
    """CPU seconds used by finished child processes: with wall time, it shows how busy the machine was."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
