"""The pipeline's stages for one output folder: the real command lines, in order, with their outputs.

<root>/distill/          train.py recipe=distill + int8 (student/, student_int8/, run_summary.json, logs/)
<root>/vision/ speech/   train.py recipe=add_modality against distill/student (plugins/<name>/, run_summary.json)
<root>/bundle/           tools/export/export.py (manifest.json with parity)
<root>/eval/             compare.json (teacher/student/int8), data/ (held-out media, chat prompts with teacher
                         answers, verifiable questions), server.json (via the API)
<root>/report/           report.md, report.html, *.png, report.json
<root>/logs/<stage>.log  everything each command printed; <root>/pipeline.json: status and time per stage
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoglm_train.pipeline.profiles import Profile
from autoglm_train.pipeline.stages import Stage

STAGES = ("distill", "compare", "vision", "speech", "export", "heldout", "serve_eval", "report")
TRAIN_STAGES = ("distill", "vision", "speech")
MODEL_NAME = "autoglm-tiny"  # the served model id


@dataclass(frozen=True)
class Options:
    """What the command line chose."""

    root: Path
    profile: Profile
    qat: bool = False
    """QAT (``quant=qat_int8``) instead of PTQ (``quant=ptq_int8``) of the distilled student."""
    overrides: tuple[tuple[str, str], ...] = ()
    """(stage, Hydra override) pairs appended to that training stage's command."""
    repo: Path = Path(".")
    """The checkout holding ``train.py``, ``conf/`` and ``tools/`` (the commands users run)."""
    python: str = sys.executable


def build_stages(opts: Options) -> list[Stage]:
    """Every stage, in the order they run."""
    root, p, py = opts.root, opts.profile, opts.python
    distill, vision, speech = root / "distill", root / "vision", root / "speech"
    bundle, evals, report = root / "bundle", root / "eval", root / "report"
    student = distill / "student"
    extra = {name: [o for stage, o in opts.overrides if stage == name] for name in TRAIN_STAGES}
    quant = "quant=qat_int8" if opts.qat else "quant=ptq_int8"

    def train(*overrides: str) -> list[str]:
        return [py, str(opts.repo / "train.py"), *overrides]

    stages = [
        Stage(
            "distill",
            f"distill the teacher into the student, then its int8 form ({'QAT' if opts.qat else 'PTQ'})",
            train("recipe=distill", quant, f"paths.output_dir={distill}", *p.distill, *extra["distill"]),
            [distill / "run_summary.json", student / "config.json", distill / "student_int8" / "model.safetensors"],
        ),
        Stage(
            "compare",
            "score teacher, student and int8 student on the held-out text (ppl, KL, agreement, size, tokens/s)",
            [
                *(py, "-m", "autoglm_train.pipeline.compare", "--run", str(distill), "--out"),
                str(evals / "compare.json"),
                *("--blocks", str(p.compare_blocks), "--new-tokens", str(p.speed_tokens)),
                *("--repeats", str(p.speed_repeats)),
            ],
            [evals / "compare.json"],
        ),
        _plugin_stage("vision", vision, student, train, [*p.vision, *extra["vision"]]),
        _plugin_stage("speech", speech, student, train, [*p.speech, *extra["speech"]]),
        Stage(
            "export",
            "export the serving bundle (decoder + int8 + plugins) and check its parity",
            [
                *(py, str(opts.repo / "tools" / "export" / "export.py"), "--decoder", str(student)),
                *("--out", str(bundle), "--name", MODEL_NAME),
                *("--plugin", str(vision / "plugins" / "vision"), "--plugin", str(speech / "plugins" / "speech")),
                *p.export,
            ],
            [bundle / "manifest.json"],
        ),
        Stage(
            "heldout",
            "write the held-out text, digit images, speech clips, chat prompts with teacher answers and verifiable "
            "questions the server is evaluated on",
            [
                *(py, "-m", "autoglm_train.pipeline.heldout", "--distill", str(distill)),
                *("--vision", str(vision), "--speech", str(speech), "--out", str(evals / "data")),
                *("--texts", str(p.eval_texts), "--items", str(p.eval_items), "--bundle", str(bundle)),
                *("--chat", str(p.eval_chat), "--verifiable", str(p.eval_verifiable)),
                *("--answer-tokens", str(p.eval_answer_tokens)),
            ],
            [evals / "data" / "manifest.json"],
        ),
        Stage(
            "serve_eval",
            "start the server on a free local port, evaluate through its API, stop it",
            [
                *(py, "-m", "autoglm_train.pipeline.serve_eval", "--bundle", str(bundle)),
                *("--data", str(evals / "data"), "--distill", str(distill), "--out", str(evals / "server.json")),
                *("--server-log", str(root / "logs" / "server.log"), "--max-tokens", str(p.eval_max_tokens)),
                *("--chat-tokens", str(p.eval_chat_tokens), "--think-tokens", str(p.eval_think_tokens)),
                *("--direct-tokens", str(p.eval_direct_tokens)),
            ],
            [evals / "server.json"],
        ),
        Stage(
            "report",
            "write the run report (tables from the runs' own summaries, training curves)",
            [py, "-m", "autoglm_train.pipeline.report", "--root", str(root)],
            [report / "report.md"],
            always=True,
        ),
    ]
    for stage in stages:
        stage.cwd = opts.repo
    return stages


def _plugin_stage(name: str, out: Path, decoder: Path, train: Callable[..., list[str]], overrides: list[str]) -> Stage:
    return Stage(
        name,
        f"train the {name} plugin against the frozen distilled student",
        train("recipe=add_modality", f"plugin={name}", f"decoder={decoder}", f"paths.output_dir={out}", *overrides),
        [out / "run_summary.json", out / "plugins" / name / "plugin.json"],
    )
