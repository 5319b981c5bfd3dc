"""``python -m autoglm_train.pipeline [--quick] [--out DIR] [--qat] [--override STAGE:KEY=VALUE ...]``.

Teacher → distilled student → int8 → vision and speech plugins → bundle → server → evaluation →
report, each stage the real command line (``train.py``, ``tools/export/export.py``, the server)
run as a subprocess. Rerunning the same command skips what is complete and continues the rest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from autoglm_train.pipeline.plan import STAGES, TRAIN_STAGES, Options, build_stages
from autoglm_train.pipeline.profiles import PROFILES, get_profile
from autoglm_train.pipeline.stages import StageFailed, run_stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m autoglm_train.pipeline",
        description="Teacher to evaluated serving bundle with a report, in one resumable command.",
    )
    p.add_argument("--profile", default="default", choices=sorted(PROFILES), help="stage sizes (default: default)")
    p.add_argument("--quick", action="store_const", const="quick", dest="profile", help="= --profile quick (CI)")
    p.add_argument("--out", help="output folder (default: outputs/demo, outputs/demo-quick for --quick)")
    p.add_argument("--qat", action="store_true", help="quantization-aware distillation instead of PTQ")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help=f"extra Hydra override for a training stage ({', '.join(TRAIN_STAGES)}), e.g. "
        "distill:trainer.max_steps=300; repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="do not echo the stages' output (it is in their logs)")
    p.add_argument("--list", action="store_true", help="print the stages and their commands, run nothing")
    return p.parse_args(argv)


def _overrides(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or stage not in TRAIN_STAGES or "=" not in override:
            raise ValueError(f"--override {item!r}: expected STAGE:KEY=VALUE with STAGE one of {TRAIN_STAGES}")
        out.append((stage, override))
    return tuple(out)


def _repo() -> Path:
    """The checkout with train.py: the current folder, else the one this package is installed from (editable)."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "train.py").is_file() and (candidate / "conf").is_dir():
            return candidate
    raise FileNotFoundError("run the pipeline from the autoglm-train checkout (no train.py and conf/ here)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profile = get_profile(args.profile)
        default_out = "outputs/demo" + ("" if profile.name == "default" else f"-{profile.name}")
        opts = Options(
            root=Path(args.out or default_out).resolve(),
            profile=profile,
            qat=args.qat,
            overrides=_overrides(args.override),
            repo=_repo(),
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stages = build_stages(opts)
    assert tuple(s.name for s in stages) == STAGES
    if args.list:
        for s in stages:
            print(f"{s.name:<11} {'done' if s.done() else 'todo':<5} {s.what}\n            {' '.join(s.command)}")
        return 0
    print(f"pipeline: profile {profile.name} (about {profile.minutes} min on 2 CPU cores) -> {opts.root}")
    start = time.monotonic()
    try:
        options = {"profile": profile.name, "qat": opts.qat, "overrides": [f"{a}:{b}" for a, b in opts.overrides]}
        run_stages(stages, opts.root, stream=not args.quiet, options=options)
    except StageFailed as err:
        print(f"pipeline: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    print(f"pipeline: done in {time.monotonic() - start:.0f} s; report: {opts.root / 'report' / 'report.md'}")
    return 0
