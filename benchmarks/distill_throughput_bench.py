"""Distillation throughput: tokens/s per device, model TFLOPS and MFU of the real ``recipe=distill`` run.

Each row is ``python train.py recipe=distill ...`` with the :class:`autoglm_train.tasks.throughput.Throughput`
callback (median step after warm-up; model FLOPs in PaLM's convention; MFU against the GPU's peak for the run's
precision). Validation, checkpoints and the post-training extras are off, so the steps are all that is timed.

    python benchmarks/distill_throughput_bench.py                 # CPU rows; on a CUDA machine the GPU rows too
    python benchmarks/distill_throughput_bench.py --teacher-path /models/Qwen2.5-1.5B   # a larger local teacher

CPU rows: the ``tiny`` student (15.5M) from SmolLM2-135M, one process and DDP over 2 processes.
GPU rows: the ``glm_1b`` student (0.98B, ``conf/model/glm_1b.yaml``) in ``bf16-mixed`` at 4 x 2048 tokens, on one
GPU, and with DDP and ZeRO-2 over every GPU when there are several.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from results import TRAIN_ONLY, write_section

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache"))


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    steps: int
    warmup: int


def cpu_rows() -> list[Row]:
    shape = ("model=tiny", "data.seq_len=128", "data.batch_size=4", "trainer.precision=32")
    return [
        Row("tiny, 1 CPU process", (*shape, "trainer=cpu"), steps=14, warmup=4),
        Row(
            "tiny, DDP 2 CPU processes",
            (*shape, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
            steps=14,
            warmup=4,
        ),
    ]


def gpu_rows(gpus: int) -> list[Row]:
    shape = ("model=glm_1b", "data.seq_len=2048", "data.batch_size=4", "trainer.precision=bf16-mixed")
    rows = [Row("glm_1b, 1 GPU", (*shape, "trainer=gpu", "trainer.devices=1"), steps=30, warmup=5)]
    if gpus > 1:
        for trainer in ("ddp", "deepspeed_zero2"):
            rows.append(
                Row(f"glm_1b, {trainer} x{gpus}", (*shape, f"trainer={trainer}", f"trainer.devices={gpus}"), 30, 5)
            )
    return rows


def run_row(row: Row, root: Path, teacher_path: str | None) -> dict:
    """One training run; returns its ``throughput.json`` (raises with the log's tail when the run fails)."""
    out = root / row.name.replace(" ", "_").replace(",", "")
    target = "autoglm_train.tasks.throughput.Throughput"
    callback = f"+callbacks=[{{_target_: {target}, warmup_steps: {row.warmup}, path: {out / 'throughput.json'}}}]"
    teacher = ["teacher=hf", f"teacher.path={teacher_path}"] if teacher_path else []
    overrides = [
        "recipe=distill",
        *row.overrides,
        *teacher,
        f"trainer.max_steps={row.steps}",
        *TRAIN_ONLY,
        f"paths.root_dir={out}",
        f"paths.cache_dir={CACHE}",
        "run_name=bench",
        callback,
    ]
    result = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"{row.name}: train.py exited {result.returncode}\n{tail}")
    return json.loads((out / "throughput.json").read_text())


def render(rows: list[tuple[Row, dict]], teacher: str) -> str:
    lines = [
        f"Teacher: {teacher}. Median optimizer step after warm-up; tokens and model FLOPs per device (student forward"
        " + backward, teacher forward; PaLM convention, recomputation not counted). MFU only where the device's peak"
        " is known (GPUs).",
        "",
        "| run | device | ranks | precision | tokens/step/device | step s | tokens/s/device | TFLOPS/device | MFU |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row, r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
        lines.append(
            f"| {row.name} | {r['device']} | {r['world_size']} | {r['precision']}"
            f" | {r['tokens_per_step_per_device']:,.0f} | {r['step_seconds_median']:.3f}"
            f" | {r['tokens_per_s_per_device']:,.0f} | {r.get('model_tflops_per_device', 0.0):.4g} | {mfu} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-path", help="a local HF causal LM dir as the teacher (default: SmolLM2-135M)")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU rows even on a CUDA machine")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = p.parse_args()

    import torch

    rows = cpu_rows()
    if torch.cuda.is_available() and not args.cpu_only:
        rows += gpu_rows(torch.cuda.device_count())
    done = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for row in rows:
            print(f"== {row.name}", flush=True)
            done.append((row, run_row(row, Path(tmp), args.teacher_path)))
    text = render(done, args.teacher_path or "SmolLM2-135M-Instruct (`teacher=smollm2_135m`, fp32)")
    print(text)
    if not args.no_write:
        write_section("Distillation throughput", text, script="distill_throughput_bench.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
