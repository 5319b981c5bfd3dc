"""Distillation quality at equal wall time: five ways to spend the same minutes of CPU on the same student.

    python benchmarks/distill_quality_bench.py                # 5 arms x 5 min of training: about 35 min on 2 cores
    python benchmarks/distill_quality_bench.py --quick        # 45 s per arm, a wiring check (RESULTS.md untouched)
    python benchmarks/distill_quality_bench.py --minutes 10 --arms kd_random teacher_init

Each arm is a real ``python train.py recipe=distill ...`` run, one after another (never in parallel), with the same
teacher (SmolLM2-135M), student shape (``model=tiny``), data, data order, seed and optimizer (AdamW 2e-3; the cosine
schedule is stretched over 10^6 steps, i.e. a constant rate after the 10 warm-up steps, since the number of steps a
time budget buys differs per arm):

  a. ce_only       ``loss.kd_ratio=0``: plain next-token CE on the text; the teacher does not run in training
  b. kd_random     forward KL + CE (``kd_ratio`` 0.5) from a random init: the recipe's default
  c. on_policy     (b) + ``loss.lmbda=0.5``: half the batches are the student's own continuations (GKD)
  d. teacher_init  (b) + ``student.init=teacher``: the teacher's weights cut to the student's shape (Minitron-style)
  e. combined      (b) + teacher init + on-policy λ=0.5: both levers together. Fixed in advance, not picked from
                   (a)-(d), so it costs no extra run and cannot overfit the held-out text; the table says which arm
                   actually ended best.

Equal wall time = the same seconds of *training* per arm (:class:`autoglm_train.tasks.wall_clock.TrainTimeBudget`):
every second of the steps counts (teacher forward, on-policy sampling, data), validation does not. Validation runs
on a wall-clock cadence (Lightning's time-based ``val_check_interval``) on the same first validation batches, so
the curves (val KL to the teacher vs training seconds) have points at about the same times in every arm. One-off
costs outside the steps (loading the teacher, teacher-init calibration, saving) are in the "process s" column.

Held-out columns come from one shared evaluation after all arms: every student and the teacher score the same first
``--heldout-blocks`` validation blocks (``quant.compare.compare_to_reference``, the function ``pipeline.compare``
uses): perplexity, KL(teacher ‖ student) in nats/token and top-1 agreement with the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results import write_section

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache"))
PLOT = Path(__file__).with_name("distill_quality_curves.png")
BUDGET = "autoglm_train.tasks.wall_clock.TrainTimeBudget"


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    overrides: tuple[str, ...]


ARMS = (
    Arm("ce_only", "(a) CE only, no teacher", ("loss.kd_ratio=0",)),
    Arm("kd_random", "(b) forward KL, random init", ()),
    Arm("on_policy", "(c) on-policy λ=0.5", ("loss.lmbda=0.5",)),
    Arm("teacher_init", "(d) teacher init + KD", ("student.init=teacher",)),
    Arm("combined", "(e) teacher init + on-policy λ=0.5", ("student.init=teacher", "loss.lmbda=0.5")),
)

SHARED = (
    "recipe=distill",
    "model=tiny",
    "trainer=cpu",
    "data.seq_len=128",
    "data.batch_size=4",
    "trainer.max_steps=1000000",  # the time budget stops the run; also stretches the cosine schedule flat
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=10",
    "recipe.checkpoint_every_n_steps=0",
    "recipe.sample_max_new_tokens=16",
    "ckpt_path=null",
)


def _interval(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for a time-based ``val_check_interval``."""
    s = max(1, round(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_arm(arm: Arm, out: Path, budget_s: float, val_every_s: float, val_batches: int) -> dict[str, Any]:
    """One training run; returns its ``wall_clock.json`` plus the process seconds (raises with the log's tail)."""
    run_dir = out / arm.key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    callback = f"+callbacks=[{{_target_: {BUDGET}, seconds: {budget_s}, path: {run_dir / 'wall_clock.json'}}}]"
    overrides = [
        *SHARED,
        *arm.overrides,
        f"trainer.val_check_interval='{_interval(val_every_s)}'",
        f"trainer.limit_val_batches={val_batches}",
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={CACHE}",
        f"run_name={arm.key}",
        callback,
    ]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as logf:
        code = subprocess.run(
            [sys.executable, "train.py", *overrides], cwd=REPO, stdout=logf, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.perf_counter() - start
    if code:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{arm.key}: train.py exited {code}\n{tail}")
    result = json.loads((run_dir / "wall_clock.json").read_text())
    result["process_seconds"] = seconds
    return result


def curve(result: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(training seconds, val KL, val top-1 agreement) per validation; the final score replaces a fit-time
    validation of the same step (Lightning validates once more when the budget stops the run)."""
    by_step: dict[int, dict] = {}
    for p in result["points"]:
        by_step[p["step"]] = p  # points are in order, the recipe's final `validate` comes last
    return [(p["train_seconds"], p["val/kl_to_teacher"], p["val/teacher_top1_agreement"]) for p in by_step.values()]


def held_out(out: Path, arms: list[Arm], blocks: int) -> dict[str, Any]:
    """Every student and the teacher on the same first ``blocks`` validation blocks: {"teacher"|arm: Score}."""
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoglm_train.distill.teacher import load_teacher, load_teacher_tokenizer
    from autoglm_train.eval.heldout_text import run_config, val_batches
    from autoglm_train.quant.compare import compare_to_reference

    first = out / arms[0].key
    spec = instantiate(run_config(first).teacher)
    teacher = load_teacher(spec)
    kd_vocab = len(load_teacher_tokenizer(spec))  # the teacher's real vocabulary, as KD compared it
    tokenizer = AutoTokenizer.from_pretrained(first / "student")
    batches = val_batches(first, tokenizer, blocks)
    students = {
        arm.key: AutoModelForCausalLM.from_pretrained(
            out / arm.key / "student", dtype=torch.float32, use_safetensors=True
        ).eval()
        for arm in arms
    }
    scores = compare_to_reference(teacher, students, batches, kd_vocab)
    scores["teacher"] = scores.pop("reference")
    return scores


def plot(arms: list[Arm], results: dict[str, dict], path: Path) -> Path:
    """Val KL to the teacher (log scale) and top-1 agreement vs training seconds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, (kl_ax, agree_ax) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for arm in arms:
        points = curve(results[arm.key])
        seconds, kl, agree = zip(*points, strict=True)
        kl_ax.plot(seconds, kl, marker="o", markersize=3, linewidth=1.4, label=arm.label)
        agree_ax.plot(seconds, agree, marker="o", markersize=3, linewidth=1.4, label=arm.label)
    kl_ax.set_yscale("log")
    for axis in (kl_ax.yaxis.set_major_formatter, kl_ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.2g"))  # plain numbers, not 6x10^0
    kl_ax.set_ylabel("val KL(teacher ‖ student), nats/token")
    agree_ax.set_ylabel("val top-1 agreement with teacher")
    for ax in (kl_ax, agree_ax):
        ax.set_xlabel("training seconds (validation excluded)")
        ax.grid(alpha=0.3)
    kl_ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render(arms: list[Arm], results: dict[str, dict], scores: dict, args: argparse.Namespace, png: str) -> str:
    teacher = scores["teacher"]
    best = min(arms, key=lambda a: scores[a.key].kl_to_ref)
    lines = [
        f"Same teacher (SmolLM2-135M-Instruct, fp32), student (`model=tiny`, 15.5M), data (Shakespeare, 4 x 128"
        f" tokens a step), seed and optimizer; {args.minutes:g} min of training per arm (validation excluded),"
        " arms run one after another on the same cores. Held-out: one shared evaluation of every student on the same"
        f" {scores['teacher'].tokens:,} validation tokens (ppl, KL(teacher ‖ student) nats/token, top-1 agreement"
        " with the teacher). *train s* = budgeted training seconds actually used, *process s* = the whole run"
        " (teacher load, teacher-init calibration, validation, save).",
        "",
        "| arm | held-out ppl | KL to teacher | top-1 agreement | steps | tokens seen | train s | process s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher (reference) | {teacher.ppl:.2f} | 0 | 100% | – | – | – | – |",
    ]
    for arm in arms:
        s, r = scores[arm.key], results[arm.key]
        lines.append(
            f"| {arm.label} | {s.ppl:.2f} | {s.kl_to_ref:.4f} | {s.top1_agreement:.2%} | {r['steps']:,}"
            f" | {r['tokens']:,} | {r['train_seconds']:.0f} | {r['process_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Lowest held-out KL: **{best.label}**. Overrides per arm (on top of `model=tiny data.seq_len=128"
        " data.batch_size=4`): " + "; ".join(f"{a.key}: `{' '.join(a.overrides) or '(none)'}`" for a in arms) + ".",
        "",
        f"![val KL to the teacher vs training seconds]({png})",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training minutes per arm (validation excluded)")
    p.add_argument("--quick", action="store_true", help="45 s per arm, fewer val/held-out blocks; no RESULTS.md")
    p.add_argument("--arms", nargs="+", choices=[a.key for a in ARMS], help="a subset of the arms (default: all)")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "distill_quality_bench", help="the arms' runs")
    p.add_argument("--val-points", type=int, default=8, help="validations per arm (time-based cadence)")
    p.add_argument("--val-batches", type=int, default=2, help="validation batches (of 4 blocks) per point")
    p.add_argument("--heldout-blocks", type=int, default=32, help="validation blocks in the shared evaluation")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.minutes, args.val_points, args.val_batches, args.heldout_blocks = 0.75, 3, 1, 8
        args.no_write = True
    arms = [a for a in ARMS if not args.arms or a.key in args.arms]
    budget = args.minutes * 60

    results = {}
    for arm in arms:
        print(f"== {arm.label}: {budget:.0f} s of training", flush=True)
        results[arm.key] = run_arm(arm, args.out, budget, budget / args.val_points, args.val_batches)
        r = results[arm.key]
        print(f"   {r['steps']} steps, {r['tokens']:,} tokens, process {r['process_seconds']:.0f} s", flush=True)
    scores = held_out(args.out, arms, args.heldout_blocks)
    png = plot(arms, results, args.out / PLOT.name if args.no_write else PLOT)
    text = render(arms, results, scores, args, png.name if not args.no_write else str(png))
    print(text)
    (args.out / "results.json").write_text(
        json.dumps({"results": results, "held_out": {k: v.to_dict() for k, v in scores.items()}}, indent=2) + "\n"
    )
    if not args.no_write:
        write_section(
            "Distillation quality at equal wall time", text, script="distill_quality_bench.py " + " ".join(sys.argv[1:])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
