"""SIGKILL a tiny ``recipe=distill`` run at random points, resume it, and check nothing was lost.

Each trial kills the same small run (real teacher, real data, real checkpoint code) several times, then lets it
finish. A kill lands at a step end (``tests.faults.KillAtStep``), inside a checkpoint write
(``tests.faults.KillInCheckpointWrite``: after the tensors, after the tree, after ``COMPLETE`` but before the rename,
or mid-removal of a rotated checkpoint), or from outside at a random moment after a step (mid-step, mid-validation or
mid-save). After every kill the next run must resume from the newest checkpoint that is really complete (checked here
independently of ``autoglm_train.utils.resume``), and at the end every recorded per-step loss (replayed steps
included) and the final weights must equal an uninterrupted reference run.

    python benchmarks/fault_inject.py --trials 6 --faults 3 --seed 0      # → benchmarks/RESULTS.md section
    python benchmarks/fault_inject.py --trials 1 --faults 1 --kinds ckpt --no-write --json out.json   # CI size

``--strategy ddp deepspeed_zero2 deepspeed_zero3 fsdp`` runs the same on 2 CPU processes (gloo) per strategy, with the
distributed faults: one rank SIGKILLed inside a step (``rank``: the survivor must exit within the collective timeout
with a line naming the lost rank), every rank SIGKILLed inside the checkpoint writer (``ckpt``: the safetensors
writer's points under DDP, the sharded save's under DeepSpeed/FSDP2), and SIGTERM inside a step (``sigterm``, to rank 0
alone or to every rank: the run must finish that step, write a complete checkpoint of it and exit 143).

    python benchmarks/fault_inject.py --strategy ddp deepspeed_zero2 deepspeed_zero3 fsdp --trials 4 --faults 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autoglm_train.utils.processes import group_alive

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache"))
KINDS = ("step", "ckpt", "external")
DIST_KINDS = ("rank", "ckpt", "sigterm")
STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
# Points a kill inside the checkpoint writer can hit in this run; `old_moved_aside` needs a save over an existing
# checkpoint of the same name, which periodic step checkpoints never do (tests/test_checkpoint_io.py covers it).
CKPT_POINTS = ("tensors_written", "tree_written", "marker_written", "removing")
SHARDED_CKPT_POINTS = ("shards_written", "shards_marked", "removing")
PREEMPTED_EXIT = 143  # autoglm_train.tasks.preemption.PREEMPTED_EXIT_CODE
LOST_RANK_EXIT = 75  # autoglm_train.tasks.preemption.LOST_RANK_EXIT_CODE
LOST_RE = re.compile(r"error: rank (\d+) stops after step \d+: lost rank (\d+)")
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-6
RESUME_RE = re.compile(r"resuming from (\S+)")


@dataclass(frozen=True)
class Shape:
    """The run every trial repeats: steps, checkpoint interval and how many checkpoints are kept."""

    steps: int = 7
    every: int = 2
    keep: int = 2


@dataclass
class Fault:
    """One kill: at a step end, inside a checkpoint write, or from outside ``delay`` s after a step was recorded;
    distributed: one ``rank`` killed inside a step, every rank killed inside the writer, or SIGTERM inside a step (to
    ``rank`` 0 alone, or to every rank with ``group``)."""

    kind: str
    step: int
    point: str | None = None
    delay: float = 0.0
    rank: int | None = None
    group: bool = False

    def callback(self, note: Path) -> str | None:
        if self.kind == "step":
            return f"{{_target_: tests.faults.KillAtStep, step: {self.step}}}"
        if self.kind == "ckpt":
            return (
                f"{{_target_: tests.faults.KillInCheckpointWrite, step: {self.step}, point: {self.point}, "
                f"group: {str(self.group).lower()}}}"
            )
        if self.kind == "rank":
            return (
                f"{{_target_: tests.faults.KillAtStep, step: {self.step}, rank: {self.rank}, mid: true, note: {note}}}"
            )
        if self.kind == "sigterm":
            return f"{{_target_: tests.faults.SignalAtStep, step: {self.step}, group: {str(self.group).lower()}}}"
        return None

    def describe(self) -> str:
        if self.kind == "step":
            return f"end of step {self.step}"
        if self.kind == "ckpt":
            return f"ckpt write @{self.step}: {self.point}" + (" (all ranks)" if self.group else "")
        if self.kind == "rank":
            return f"rank {self.rank} in step {self.step}"
        if self.kind == "sigterm":
            return f"SIGTERM to {'all ranks' if self.group else 'rank 0'} in step {self.step}"
        return f"external, {self.delay:.2f} s after step {self.step}"


@dataclass
class Event:
    """One process of a trial: the fault it carried, how it ended, where it resumed from."""

    fault: str | None
    kind: str | None
    returncode: int
    seconds: float
    expected_resume: int
    resumed_from: int
    first_step: int | None
    debris: list[str] = field(default_factory=list)
    survivor_exit_s: float | None = None
    """Distributed ``rank`` faults: seconds from the kill until the last surviving rank had exited."""
    lost_line: str | None = None


@dataclass
class Trial:
    index: int
    strategy: str | None = None
    events: list[Event] = field(default_factory=list)
    kills: int = 0
    missed: int = 0
    max_loss_diff: float = 0.0
    max_weight_diff: float = 0.0
    problems: list[str] = field(default_factory=list)


def _micro():
    """``tests.micro_distill``: the micro run the tests use (the runs here load ``tests.faults`` callbacks too)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tests.micro_distill

    return tests.micro_distill


def write_corpus(path: Path) -> Path:
    """A small real corpus: the first 12 Shakespeare documents, 1,500 characters each."""
    return _micro().write_micro_corpus(path)


def overrides(
    root: Path, corpus: Path, shape: Shape, callbacks: list[str], strategy: str | None = None, timeout: float = 60
) -> list[str]:
    """Tiny shapes (a 3M-param student) so one run takes seconds; validation mid-run included."""
    dist = []
    if strategy:
        dist = [
            f"trainer={strategy}",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32",
            f"fault_tolerance.collective_timeout_s={timeout:g}",
        ]
    return [
        *dist,
        "recipe=distill",
        *_micro().MICRO_SHAPE,
        f"data.source={corpus}",
        f"trainer.max_steps={shape.steps}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"recipe.checkpoint_every_n_steps={shape.every}",
        f"recipe.keep_checkpoints={shape.keep}",
        "recipe.sample_max_new_tokens=4",
        f"paths.root_dir={root}",
        f"paths.cache_dir={CACHE}",
        "run_name=t",
        f"callbacks=[{', '.join(callbacks)}]",
    ]


def read_losses(path: Path) -> list[tuple[tuple[int, int], float, str, str]]:
    """``((rank, step), loss, rng hash, batch hash)`` records in order; a line torn by a kill (never seen so far) is
    dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = (int(row.get("rank", 0)), int(row["step"]))
        rows.append((key, float(row["loss"]), str(row.get("rng", "")), str(row.get("batch", ""))))
    return rows


def complete_checkpoints(ckpt_dir: Path) -> tuple[dict[int, Path], list[str]]:
    """``{step: dir}`` of checkpoints whose ``COMPLETE`` marker matches the file sizes, and the other entries.

    Written here from the on-disk format alone, so it does not share a bug with the resume code it checks.
    """
    complete: dict[int, Path] = {}
    debris: list[str] = []
    if not ckpt_dir.is_dir():
        return complete, debris
    for entry in sorted(ckpt_dir.iterdir()):
        match = re.fullmatch(r"step=(\d+)\.ckpt", entry.name)
        try:
            sizes = json.loads((entry / "COMPLETE").read_text())["files"]
            ok = match is not None and all((entry / n).stat().st_size == s for n, s in sizes.items())
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            complete[int(match[1])] = entry
        else:
            debris.append(entry.name)
    return complete, debris


def run_train(
    root: Path,
    corpus: Path,
    shape: Shape,
    fault: Fault | None,
    threads: int,
    timeout: float,
    strategy: str | None = None,
    collective_timeout: float = 60,
):
    """One ``python train.py`` run (all its ranks, in their own process group); an external fault is delivered here.

    Returns (returncode of the launching rank, output, seconds, survivor exit seconds or None).
    """
    losses = root / "loss.jsonl"
    note = root / "faults.jsonl"
    callbacks = [f"{{_target_: tests.faults.LossRecorder, path: {losses}}}"]
    if fault is not None and fault.callback(note):
        callbacks.append(fault.callback(note))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    log_path = root / f"run-{time.monotonic_ns()}.log"
    earlier = len(read_losses(losses))  # an external kill waits for a step recorded by this run, not a previous one
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *overrides(root, corpus, shape, callbacks, strategy, collective_timeout)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its ranks share one process group: a group kill reaches them all, not us
        )
        killed_at = None
        while proc.poll() is None or group_alive(proc.pid):
            if time.monotonic() - start > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"train.py ran over {timeout:.0f} s; log: {log_path}")
            if fault is not None and fault.kind == "external":
                done = [key[1] for key, *_ in read_losses(losses)[earlier:]]
                if killed_at is None and done and done[-1] >= fault.step:
                    killed_at = time.monotonic() + fault.delay
                if killed_at is not None and time.monotonic() >= killed_at:
                    proc.send_signal(signal.SIGKILL)
            time.sleep(0.02)
    ended = time.time()
    survivor = None
    if note.exists():  # a rank killed itself: how long the others took to notice and leave
        fired = [json.loads(line) for line in note.read_text().splitlines() if line.strip()]
        note.unlink()
        if fired:
            survivor = round(ended - fired[-1]["t"], 2)
    return proc.returncode, log_path.read_text(), time.monotonic() - start, survivor


def plan_dist_fault(
    rng: random.Random, resumed: int, shape: Shape, kinds: list[str], used: Counter, strategy: str
) -> Fault:
    """A distributed fault in a run resuming after step ``resumed``; writer points and kinds least-used first."""
    ckpt_steps = [s for s in range(shape.every, shape.steps + 1, shape.every) if s > resumed]
    choices = [k for k in kinds if k != "ckpt" or ckpt_steps]
    fewest_kind = min(used[f"kind:{k}"] for k in choices)
    kind = rng.choice([k for k in choices if used[f"kind:{k}"] == fewest_kind])
    used[f"kind:{kind}"] += 1
    step = rng.randint(min(resumed + 1, shape.steps), shape.steps)
    if kind == "ckpt":
        window = shape.every * shape.keep
        removal_steps = [s for s in ckpt_steps if s > window and s - window != resumed]
        all_points = CKPT_POINTS if strategy == "ddp" else SHARDED_CKPT_POINTS
        points = [p for p in all_points if p != "removing" or removal_steps]
        fewest = min(used[f"{strategy}:{p}"] for p in points)
        point = rng.choice([p for p in points if used[f"{strategy}:{p}"] == fewest])
        used[f"{strategy}:{point}"] += 1
        return Fault("ckpt", rng.choice(removal_steps if point == "removing" else ckpt_steps), point, group=True)
    if kind == "rank":
        return Fault("rank", step, rank=rng.choice([0, 1]))
    return Fault("sigterm", step, group=rng.choice([False, True]))


def plan_fault(rng: random.Random, resumed: int, shape: Shape, kinds: list[str], used: Counter) -> Fault:
    """A fault that fires in a run resuming after step ``resumed`` (so every kill costs progress, never loops).

    Checkpoint-writer points are taken least-used first (``used`` counts them across trials), so a handful of kills
    covers every point; the step and the rest are random.
    """
    ckpt_steps = [s for s in range(shape.every, shape.steps + 1, shape.every) if s > resumed]
    choices = [k for k in kinds if k != "ckpt" or ckpt_steps]
    kind = rng.choice(choices or ["step"])
    if kind == "ckpt":
        # top-k rotation deletes the oldest kept checkpoint, except the one the run resumed from (Lightning keeps it)
        window = shape.every * shape.keep
        removal_steps = [s for s in ckpt_steps if s > window and s - window != resumed]
        points = [p for p in CKPT_POINTS if p != "removing" or removal_steps]
        fewest = min(used[p] for p in points)
        point = rng.choice([p for p in points if used[p] == fewest])
        used[point] += 1
        return Fault("ckpt", rng.choice(removal_steps if point == "removing" else ckpt_steps), point)
    # up to the last step: a kill after it lands in the final validation or the student's save
    step = rng.randint(min(resumed + 1, shape.steps), shape.steps)
    if kind == "external":
        return Fault("external", step, delay=round(rng.uniform(0.0, 0.8), 2))
    return Fault("step", step)


def student_weights(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / "outputs" / "t" / "student" / "model.safetensors"))


def reference_run(
    work: Path, corpus: Path, shape: Shape, threads: int, timeout: float, strategy: str | None = None
) -> tuple[dict, dict, float]:
    root = work / f"reference-{strategy or 'single'}"
    root.mkdir()
    rc, out, seconds, _ = run_train(root, corpus, shape, None, threads, timeout, strategy)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}):\n{out[-3000:]}")
    losses = {key: (loss, rng, batch) for key, loss, rng, batch in read_losses(root / "loss.jsonl")}
    ranks = range(2 if strategy else 1)
    if sorted(losses) != [(r, s) for r in ranks for s in range(1, shape.steps + 1)]:
        raise RuntimeError(f"reference run recorded (rank, step) {sorted(losses)}")
    return losses, student_weights(root), seconds


def run_trial(
    index: int,
    args: argparse.Namespace,
    work: Path,
    corpus: Path,
    shape: Shape,
    ref,
    used: Counter,
    strategy: str | None = None,
) -> Trial:
    ref_losses, ref_weights = ref
    rng = random.Random(f"{args.seed}-{strategy or ''}-{index}" if strategy else f"{args.seed}-{index}")
    root = work / f"{strategy or 'single'}-trial{index}"
    root.mkdir()
    ckpt_dir = root / "outputs" / "t" / "checkpoints"
    trial = Trial(index, strategy)
    finished = False
    for n in range(args.faults + 1):
        complete, _ = complete_checkpoints(ckpt_dir)
        expected = max(complete, default=0)
        fault = None
        if n < args.faults:
            fault = (
                plan_dist_fault(rng, expected, shape, args.kinds, used, strategy)
                if strategy
                else plan_fault(rng, expected, shape, args.kinds, used)
            )
        seen = len(read_losses(root / "loss.jsonl"))
        rc, out, seconds, survivor = run_train(
            root, corpus, shape, fault, args.threads, args.run_timeout, strategy, args.collective_timeout
        )
        match = RESUME_RE.search(out)
        resumed = int(re.search(r"step=(\d+)", match[1])[1]) if match else 0
        if match and Path(match[1]) != complete.get(resumed):
            trial.problems.append(f"run {n}: resumed from {match[1]}, not a complete checkpoint")
        if resumed != expected:
            trial.problems.append(f"run {n}: resumed from step {resumed}, newest complete checkpoint is {expected}")
        new = [key for key, *_ in read_losses(root / "loss.jsonl")[seen:] if key[0] == 0]
        first = new[0][1] if new else None
        if first is not None and first != resumed + 1:
            trial.problems.append(f"run {n}: first step after resume is {first}, expected {resumed + 1}")
        after, debris = complete_checkpoints(ckpt_dir)
        what, kind = (fault.describe(), fault.kind) if fault else (None, None)
        lost = LOST_RE.search(out)
        event = Event(what, kind, rc, round(seconds, 1), expected, resumed, first, debris, survivor)
        event.lost_line = lost[0] if lost else None
        trial.events.append(event)
        if rc == 0:
            finished = True
            if fault is not None:
                trial.missed += 1  # the run ended before the fault fired: it still has to be right
            break
        if fault is None:
            trial.problems.append(f"run {n}: exit code {rc}\n{out[-2000:]}")
            return trial
        problem = _check_fault_outcome(fault, rc, out, after, survivor, args.collective_timeout)
        if problem:
            trial.problems.append(f"run {n} ({fault.describe()}): {problem}\n{out[-1500:]}")
            return trial
        trial.kills += 1
    if not finished:
        trial.problems.append("the last run did not finish")
        return trial
    if trial.events[-1].debris:  # resume deletes interrupted writes before the run saves again
        trial.problems.append(f"scratch left after the final run: {trial.events[-1].debris}")
    records = read_losses(root / "loss.jsonl")
    keys = {key for key, *_ in records}
    if keys != set(ref_losses):
        trial.problems.append(f"(rank, step) recorded {sorted(keys)} != reference {sorted(ref_losses)}")
    for key, loss, rng_hash, batch_hash in records:
        want, want_rng, want_batch = ref_losses.get(key, (float("inf"), "", ""))
        if want_batch and batch_hash != want_batch:  # the data position: same input ids as the reference
            trial.problems.append(f"rank {key[0]} step {key[1]}: batch {batch_hash} != reference {want_batch}")
        trial.max_loss_diff = max(trial.max_loss_diff, abs(loss - want))
        if rng_hash != want_rng:
            trial.problems.append(f"rank {key[0]} step {key[1]}: random state {rng_hash} != reference {want_rng}")
    weights = student_weights(root)
    if set(weights) != set(ref_weights):
        trial.problems.append("final weights have other tensor names")
    for name, tensor in ref_weights.items():
        if name in weights:
            diff = float((weights[name].double() - tensor.double()).abs().max()) if tensor.numel() else 0.0
            trial.max_weight_diff = max(trial.max_weight_diff, diff)
    if trial.max_loss_diff > LOSS_TOL:
        trial.problems.append(f"a loss differs from the reference by {trial.max_loss_diff:.2e}")
    if trial.max_weight_diff > WEIGHT_TOL:
        trial.problems.append(f"final weights differ from the reference by {trial.max_weight_diff:.2e}")
    return trial


def _check_fault_outcome(
    fault: Fault, rc: int, out: str, complete: dict[int, Path], survivor: float | None, collective_timeout: float
) -> str | None:
    """What is wrong with how a faulted run ended (None: as promised)."""
    if fault.kind in ("step", "ckpt", "external"):
        return None if rc == -signal.SIGKILL else f"exit code {rc}, expected SIGKILL"
    if fault.kind == "sigterm":
        if rc != PREEMPTED_EXIT:
            return f"exit code {rc}, expected {PREEMPTED_EXIT} after a preemption save"
        if max(complete, default=0) != fault.step:
            return f"newest complete checkpoint is step {max(complete, default=0)}, expected step {fault.step}"
        return None
    # one rank killed: the launching rank was the victim (SIGKILL) or a survivor (its own exit status, or SIGKILL
    # from Lightning's child-process observer when that fires first)
    if rc not in (-signal.SIGKILL, LOST_RANK_EXIT):
        return f"exit code {rc}, expected {LOST_RANK_EXIT} (lost rank) or SIGKILL"
    if survivor is None or survivor > collective_timeout:
        return f"the surviving rank took {survivor} s to exit (collective timeout {collective_timeout:g} s)"
    lost = LOST_RE.search(out)
    if rc == LOST_RANK_EXIT and (lost is None or int(lost[2]) != fault.rank):
        return f"no line naming the lost rank {fault.rank}"
    return None


def table(trials: list[Trial]) -> str:
    rows = [
        "| trial | kill points (→ resumed from step) | kills | scratch dirs after kills / at end "
        "| max abs Δloss | max abs Δweight | lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        points, debris, left, lost = _trial_cells(t, with_status=False)
        rows.append(
            f"| {t.index} | {points} | {t.kills} | {debris} / {left} "
            f"| {t.max_loss_diff:.1e} | {t.max_weight_diff:.1e} | {lost} |"
        )
    return "\n".join(rows)


def _trial_cells(t: Trial, with_status: bool) -> tuple[str, int, int, str]:
    """(faults → resumed-from steps, scratch seen after the faults, scratch left at the end, lost) of a trial."""
    points = "; ".join(
        f"{e.fault}{f' ({e.returncode})' if with_status else ''} → {t.events[i + 1].resumed_from}"
        for i, e in enumerate(t.events[:-1])
        if e.fault
    )
    debris = sum(len(e.debris) for e in t.events if e.returncode)  # seen right after each kill
    left = len(t.events[-1].debris) if t.events else 0
    lost = "none" if not t.problems else f"**{len(t.problems)} problem(s)**"
    return points or "-", debris, left, lost


def dist_table(trials: list[Trial]) -> str:
    """One row per distributed trial: the faults, how each run ended, how fast survivors left, and the deltas."""
    rows = [
        "| strategy | trial | faults (exit status → resumed from step) | survivor exit (s) | scratch after faults / "
        "at end | max abs Δloss | max abs Δweight | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        points, debris, left, lost = _trial_cells(t, with_status=True)
        exits = [f"{e.survivor_exit_s:.1f}" for e in t.events if e.survivor_exit_s is not None]
        rows.append(
            f"| {t.strategy} | {t.index} | {points} | {', '.join(exits) or '-'} | {debris} / {left} "
            f"| {t.max_loss_diff:.1e} | {t.max_weight_diff:.1e} | {lost} |"
        )
    return "\n".join(rows)


def summary(trials: list[Trial], ref_seconds: float, total: float, args: argparse.Namespace) -> dict:
    kinds = dict.fromkeys(KINDS + tuple(k for k in DIST_KINDS if k not in KINDS), 0)
    for t in trials:
        for e in t.events:
            if e.kind and e.returncode:
                kinds[e.kind] += 1
    return {
        "trials": len(trials),
        "kills": sum(t.kills for t in trials),
        "kills_by_kind": kinds,
        "faults_missed": sum(t.missed for t in trials),
        "resumes": sum(len(t.events) - 1 for t in trials),
        "problems": [p for t in trials for p in t.problems],
        "max_loss_diff": max((t.max_loss_diff for t in trials), default=0.0),
        "max_weight_diff": max((t.max_weight_diff for t in trials), default=0.0),
        "max_survivor_exit_s": max(
            (e.survivor_exit_s for t in trials for e in t.events if e.survivor_exit_s is not None), default=None
        ),
        "lost_rank_lines": sum(1 for t in trials for e in t.events if e.lost_line),
        "by_strategy": {
            name: {
                "trials": sum(1 for t in trials if t.strategy == name),
                "faults": sum(t.kills for t in trials if t.strategy == name),
            }
            for name in sorted({t.strategy for t in trials if t.strategy})
        },
        "reference_seconds": round(ref_seconds, 1),
        "total_seconds": round(total, 1),
        "seed": args.seed,
        "trial_details": [asdict(t) for t in trials],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="trials (per strategy with --strategy)")
    p.add_argument("--faults", type=int, default=2, help="kills per trial before the run may finish")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", nargs="+", choices=STRATEGIES, help="2-process runs of these trainers (gloo)")
    p.add_argument("--kinds", nargs="+", choices=sorted(set(KINDS + DIST_KINDS)), help="fault kinds to draw from")
    p.add_argument("--steps", type=int, default=Shape.steps, help="optimizer steps per run")
    p.add_argument("--max-seconds", type=float, default=600, help="no new trial starts after this")
    p.add_argument("--run-timeout", type=float, default=300, help="one train.py process may take this long")
    p.add_argument("--collective-timeout", type=float, default=60, help="fault_tolerance.collective_timeout_s")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a busy machine)")
    p.add_argument("--workdir", help="keep runs here (default: a temp dir, removed)")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--from-json", help="render (and write) the table of an earlier --json result instead of running")
    args = p.parse_args(argv)
    if args.from_json:
        return report(json.loads(Path(args.from_json).read_text()), args, argv)
    allowed = DIST_KINDS if args.strategy else KINDS
    args.kinds = args.kinds or list(allowed)
    if bad := [k for k in args.kinds if k not in allowed]:
        p.error(f"--kinds {bad} cannot be used {'with' if args.strategy else 'without'} --strategy; use {allowed}")
    shape = Shape(steps=args.steps)

    start = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault-inject-"))
    work.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    ref_seconds = 0.0
    try:
        corpus = write_corpus(work / "corpus.jsonl")
        used: Counter = Counter()
        for strategy in args.strategy or [None]:
            ref_losses, ref_weights, ref_seconds = reference_run(
                work, corpus, shape, args.threads, args.run_timeout, strategy
            )
            print(f"reference run ({strategy or 'single process'}): {shape.steps} steps in {ref_seconds:.1f} s")
            for index in range(args.trials):
                if trials and time.monotonic() - start > args.max_seconds:
                    print(f"--max-seconds {args.max_seconds:g} reached after {len(trials)} trial(s)")
                    break
                trial = run_trial(index, args, work, corpus, shape, (ref_losses, ref_weights), used, strategy)
                trials.append(trial)
                print(f"{strategy or ''} trial {index}: {[e.fault for e in trial.events]} problems={trial.problems}")
                sys.stdout.flush()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = summary(trials, ref_seconds, time.monotonic() - start, args)
    result["argv"] = list(argv if argv is not None else sys.argv[1:])
    result["strategies"] = args.strategy
    result["shape"] = asdict(shape)
    result["collective_timeout"] = args.collective_timeout
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return report(result, args, argv)


def _trials_from(result: dict) -> list[Trial]:
    trials = []
    for raw in result["trial_details"]:
        events = [Event(**e) for e in raw.pop("events")]
        trials.append(Trial(**raw, events=events))
    return trials


def report(result: dict, args: argparse.Namespace, argv: list[str] | None) -> int:
    """Print the table and verdict of ``result`` (from :func:`summary`), and write the RESULTS.md section."""
    trials = _trials_from(result)
    strategies = result.get("strategies")
    shape = Shape(**result.get("shape", {}))
    timeout = result.get("collective_timeout", args.collective_timeout)
    k = result["kills_by_kind"]
    if strategies:
        text = dist_table(trials)
        verdict = (
            f"{result['trials']} trial(s) over {', '.join(strategies)}, {result['kills']} faults ({k['rank']} "
            f"SIGKILLs of one rank inside a step, {k['ckpt']} SIGKILLs of every rank inside the checkpoint writer, "
            f"{k['sigterm']} SIGTERMs), {result['resumes']} resumes, {result['faults_missed']} fault(s) the run "
            f"outran; problems: {len(result['problems'])}; max |Δloss| {result['max_loss_diff']:.1e} (tol "
            f"{LOSS_TOL:g}), max |Δweight| {result['max_weight_diff']:.1e} (tol {WEIGHT_TOL:g}); slowest survivor exit "
            f"{result['max_survivor_exit_s']} s (collective timeout {timeout:g} s), "
            f"{result['lost_rank_lines']} lost-rank line(s); {result['total_seconds']:.0f} s total."
        )
    else:
        text = table(trials)
        verdict = (
            f"{result['trials']} trial(s), {result['kills']} SIGKILLs ({k['ckpt']} inside checkpoint writes, "
            f"{k['step']} at step ends, {k['external']} from outside mid-run), {result['resumes']} resumes, "
            f"{result['faults_missed']} fault(s) the run outran; problems: {len(result['problems'])}; "
            f"max |Δloss| {result['max_loss_diff']:.1e} (tol {LOSS_TOL:g}), "
            f"max |Δweight| {result['max_weight_diff']:.1e} (tol {WEIGHT_TOL:g}); "
            f"{result['total_seconds']:.0f} s total, reference run {result['reference_seconds']:.0f} s."
        )
    print(text + "\n\n" + verdict)
    for problem in result["problems"]:
        print("PROBLEM:", problem)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results import write_section

        argv_text = " ".join(result.get("argv") or (argv if argv is not None else sys.argv[1:]))
        if strategies:
            body = (
                f"Tiny `recipe=distill` on 2 CPU processes (gloo) per strategy ({shape.steps} steps, checkpoint every "
                f"{shape.every}, keep {shape.keep}), faulted and resumed until it finishes; each run is compared with "
                "one uninterrupted reference run of the same strategy (every rank's per-step loss and random state, "
                "the final student). *Survivor exit*: seconds from a rank's SIGKILL until the last other rank had "
                "exited.\n\n" + text + "\n\n" + verdict
            )
            title = "Fault injection: distributed (SIGKILL of a rank, SIGKILL in the writer, SIGTERM)"
        else:
            body = (
                f"Tiny `recipe=distill` ({shape.steps} steps, checkpoint every {shape.every}, keep {shape.keep}), "
                "killed with SIGKILL and resumed until it finishes; each run is compared with one uninterrupted "
                "reference run. *Scratch dirs* are the half-written checkpoint directories found right after the "
                "kills (resume must never pick them; it deletes them before the run writes again) and at the end.\n\n"
                + text
                + "\n\n"
                + verdict
            )
            title = "Fault injection: SIGKILL and resume"
        write_section(title, body, script=f"fault_inject.py {argv_text}".strip())
    return 1 if result["problems"] or not trials else 0


if __name__ == "__main__":
    sys.exit(main())
