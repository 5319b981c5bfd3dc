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
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache"))
KINDS = ("step", "ckpt", "external")
# Points a kill inside the checkpoint writer can hit in this run; `old_moved_aside` needs a save over an existing
# checkpoint of the same name, which periodic step checkpoints never do (tests/test_checkpoint_io.py covers it).
CKPT_POINTS = ("tensors_written", "tree_written", "marker_written", "removing")
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
    """One kill: at a step end, inside a checkpoint write, or from outside ``delay`` s after a step was recorded."""

    kind: str
    step: int
    point: str | None = None
    delay: float = 0.0

    def callback(self) -> str | None:
        if self.kind == "step":
            return f"{{_target_: tests.faults.KillAtStep, step: {self.step}}}"
        if self.kind == "ckpt":
            return f"{{_target_: tests.faults.KillInCheckpointWrite, step: {self.step}, point: {self.point}}}"
        return None

    def describe(self) -> str:
        if self.kind == "step":
            return f"end of step {self.step}"
        if self.kind == "ckpt":
            return f"ckpt write @{self.step}: {self.point}"
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


@dataclass
class Trial:
    index: int
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


def overrides(root: Path, corpus: Path, shape: Shape, callbacks: list[str]) -> list[str]:
    """Tiny shapes (a 3M-param student) so one run takes seconds; validation mid-run included."""
    return [
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


def read_losses(path: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` records in order; a line torn by a kill (never seen so far) would be dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append((int(row["step"]), float(row["loss"])))
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


def run_train(root: Path, corpus: Path, shape: Shape, fault: Fault | None, threads: int, timeout: float):
    """One ``python train.py`` process; an external fault is delivered here. Returns (returncode, output, seconds)."""
    losses = root / "loss.jsonl"
    callbacks = [f"{{_target_: tests.faults.LossRecorder, path: {losses}}}"]
    if fault is not None and fault.callback():
        callbacks.append(fault.callback())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    log_path = root / f"run-{time.monotonic_ns()}.log"
    earlier = len(read_losses(losses))  # an external kill waits for a step recorded by this run, not a previous one
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *overrides(root, corpus, shape, callbacks)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        killed_at = None
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"train.py ran over {timeout:.0f} s; log: {log_path}")
            if fault is not None and fault.kind == "external":
                done = [s for s, _ in read_losses(losses)[earlier:]]
                if killed_at is None and done and done[-1] >= fault.step:
                    killed_at = time.monotonic() + fault.delay
                if killed_at is not None and time.monotonic() >= killed_at:
                    proc.send_signal(signal.SIGKILL)
            time.sleep(0.02)
    return proc.returncode, log_path.read_text(), time.monotonic() - start


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


def reference_run(work: Path, corpus: Path, shape: Shape, threads: int, timeout: float):
    root = work / "reference"
    root.mkdir()
    rc, out, seconds = run_train(root, corpus, shape, None, threads, timeout)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}):\n{out[-3000:]}")
    losses = dict(read_losses(root / "loss.jsonl"))
    if sorted(losses) != list(range(1, shape.steps + 1)):
        raise RuntimeError(f"reference run recorded steps {sorted(losses)}")
    return losses, student_weights(root), seconds


def run_trial(
    index: int, args: argparse.Namespace, work: Path, corpus: Path, shape: Shape, ref, used: Counter
) -> Trial:
    ref_losses, ref_weights = ref
    rng = random.Random(f"{args.seed}-{index}")
    root = work / f"trial{index}"
    root.mkdir()
    ckpt_dir = root / "outputs" / "t" / "checkpoints"
    trial = Trial(index)
    finished = False
    for n in range(args.faults + 1):
        complete, _ = complete_checkpoints(ckpt_dir)
        expected = max(complete, default=0)
        fault = plan_fault(rng, expected, shape, args.kinds, used) if n < args.faults else None
        seen = len(read_losses(root / "loss.jsonl"))
        rc, out, seconds = run_train(root, corpus, shape, fault, args.threads, args.run_timeout)
        match = RESUME_RE.search(out)
        resumed = int(re.search(r"step=(\d+)", match[1])[1]) if match else 0
        if match and Path(match[1]) != complete.get(resumed):
            trial.problems.append(f"run {n}: resumed from {match[1]}, not a complete checkpoint")
        if resumed != expected:
            trial.problems.append(f"run {n}: resumed from step {resumed}, newest complete checkpoint is {expected}")
        new = read_losses(root / "loss.jsonl")[seen:]
        first = new[0][0] if new else None
        if first is not None and first != resumed + 1:
            trial.problems.append(f"run {n}: first step after resume is {first}, expected {resumed + 1}")
        _, debris = complete_checkpoints(ckpt_dir)
        what, kind = (fault.describe(), fault.kind) if fault else (None, None)
        trial.events.append(Event(what, kind, rc, round(seconds, 1), expected, resumed, first, debris))
        if rc == 0:
            finished = True
            if fault is not None:
                trial.missed += 1  # the run ended before the fault fired: it still has to be right
            break
        if rc != -signal.SIGKILL or fault is None:
            trial.problems.append(f"run {n}: exit code {rc}\n{out[-2000:]}")
            return trial
        trial.kills += 1
    if not finished:
        trial.problems.append("the last run did not finish")
        return trial
    if trial.events[-1].debris:  # resume deletes interrupted writes before the run saves again
        trial.problems.append(f"scratch left after the final run: {trial.events[-1].debris}")
    records = read_losses(root / "loss.jsonl")
    steps = {s for s, _ in records}
    if steps != set(ref_losses):
        trial.problems.append(f"steps recorded {sorted(steps)} != reference {sorted(ref_losses)}")
    for step, loss in records:
        trial.max_loss_diff = max(trial.max_loss_diff, abs(loss - ref_losses.get(step, float("inf"))))
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


def table(trials: list[Trial]) -> str:
    rows = [
        "| trial | kill points (→ resumed from step) | kills | scratch dirs after kills / at end "
        "| max abs Δloss | max abs Δweight | lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        points = "; ".join(
            f"{e.fault} → {t.events[i + 1].resumed_from}" for i, e in enumerate(t.events[:-1]) if e.fault
        )
        debris = sum(len(e.debris) for e in t.events if e.returncode)  # seen right after each kill
        left = len(t.events[-1].debris) if t.events else 0
        lost = "none" if not t.problems else f"**{len(t.problems)} problem(s)**"
        rows.append(
            f"| {t.index} | {points or '-'} | {t.kills} | {debris} / {left} "
            f"| {t.max_loss_diff:.1e} | {t.max_weight_diff:.1e} | {lost} |"
        )
    return "\n".join(rows)


def summary(trials: list[Trial], ref_seconds: float, total: float, args: argparse.Namespace) -> dict:
    kinds = dict.fromkeys(KINDS, 0)
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
        "reference_seconds": round(ref_seconds, 1),
        "total_seconds": round(total, 1),
        "seed": args.seed,
        "trial_details": [asdict(t) for t in trials],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--faults", type=int, default=2, help="kills per trial before the run may finish")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--steps", type=int, default=Shape.steps, help="optimizer steps per run")
    p.add_argument("--max-seconds", type=float, default=600, help="no new trial starts after this")
    p.add_argument("--run-timeout", type=float, default=300, help="one train.py process may take this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a busy machine)")
    p.add_argument("--workdir", help="keep runs here (default: a temp dir, removed)")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    shape = Shape(steps=args.steps)

    start = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault-inject-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = write_corpus(work / "corpus.jsonl")
        ref_losses, ref_weights, ref_seconds = reference_run(work, corpus, shape, args.threads, args.run_timeout)
        print(f"reference run: {shape.steps} steps in {ref_seconds:.1f} s", flush=True)
        trials: list[Trial] = []
        used: Counter = Counter()
        for index in range(args.trials):
            if trials and time.monotonic() - start > args.max_seconds:
                print(f"--max-seconds {args.max_seconds:g} reached after {len(trials)} trial(s)")
                break
            trial = run_trial(index, args, work, corpus, shape, (ref_losses, ref_weights), used)
            trials.append(trial)
            print(f"trial {index}: {[e.fault for e in trial.events]} problems={trial.problems}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = summary(trials, ref_seconds, time.monotonic() - start, args)
    text = table(trials)
    k = result["kills_by_kind"]
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
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results import write_section

        body = (
            f"Tiny `recipe=distill` ({shape.steps} steps, checkpoint every {shape.every}, keep {shape.keep}), "
            "killed with SIGKILL and resumed until it finishes; each run is compared with one uninterrupted "
            "reference run. *Scratch dirs* are the half-written checkpoint directories found right after the "
            "kills (resume must never pick them; it deletes them before the run writes again) and at the end.\n\n"
            + text
            + "\n\n"
            + verdict
        )
        argv_text = " ".join(argv if argv is not None else sys.argv[1:])
        write_section("Fault injection: SIGKILL and resume", body, script=f"fault_inject.py {argv_text}".strip())
    return 1 if result["problems"] or not trials else 0


if __name__ == "__main__":
    sys.exit(main())
