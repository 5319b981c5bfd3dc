"""The one-command pipeline: skip/resume/failure with real subprocesses, and the report of a real tiny run.

The tiny run is the pipeline's own distill + compare + report stages (real ``train.py`` and CLIs as
subprocesses) on a micro student and a few Shakespeare documents; the end-to-end ``--quick`` run of
every stage is in ``test_pipeline_e2e.py`` (slow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest

from autoglm_train.pipeline.cli import main as pipeline_main
from autoglm_train.pipeline.plan import STAGES, Options, build_stages
from autoglm_train.pipeline.profiles import PROFILES, QUICK
from autoglm_train.pipeline.report import fmt
from autoglm_train.pipeline.stages import Stage, StageFailed, load_state, run_stages
from tests.conftest import CACHE, REPO
from tests.micro_distill import MICRO_SHAPE, write_micro_corpus
from tests.pipeline_support import check_report_cells


# --- the runner, with real (tiny) subprocesses ----------------------------------------------------------------------
def _stage(name: str, out: Path, fails_unless: Path | None = None) -> Stage:
    """A stage writing ``out``; with ``fails_unless``, it prints 'boom' and exits 3 while that file is missing."""
    code = "import pathlib, sys\n"
    if fails_unless is not None:
        code += f"if not pathlib.Path({str(fails_unless)!r}).exists():\n    print('boom'); sys.exit(3)\n"
    code += f"pathlib.Path({str(out)!r}).write_text('made by {name}'); print('wrote {name}')\n"
    return Stage(name, f"test stage {name}", [sys.executable, "-c", code], [out])


def _runs(log: Path) -> int:
    """How many times a stage's command ran (each run appends a header to its log)."""
    return log.read_text().count("\n===== ") if log.exists() else 0


def test_a_failing_stage_names_itself_and_its_log_and_a_rerun_continues_after_the_complete_ones(tmp_path):
    root, fixed = tmp_path / "run", tmp_path / "fixed"
    root.mkdir()
    a, b, c = root / "a.txt", root / "b.txt", root / "c.txt"
    stages = [_stage("a", a), _stage("b", b, fails_unless=fixed), _stage("c", c)]
    lines: list[str] = []

    with pytest.raises(StageFailed) as failed:
        run_stages(stages, root, echo=lines.append, stream=False)
    log = root / "logs" / "b.log"
    assert failed.value.stage == "b" and failed.value.log == log and failed.value.returncode == 3
    message = str(failed.value)
    assert "stage 'b' failed (exit code 3)" in message and str(log) in message and "boom" in message
    assert a.read_text() == "made by a" and not c.exists()  # earlier output kept, later stage never ran
    state = load_state(root)["stages"]
    assert (state["a"]["status"], state["b"]["status"]) == ("done", "failed") and "c" not in state
    a_written = a.stat().st_mtime_ns

    fixed.touch()
    lines.clear()
    run_stages(stages, root, echo=lines.append, stream=False)
    assert any(line.startswith("[1/3 a] complete already") for line in lines), lines
    assert a.stat().st_mtime_ns == a_written and _runs(root / "logs" / "a.log") == 1  # skipped, not rerun
    assert _runs(log) == 2 and "boom" in log.read_text()  # the failed run's log is kept, the rerun appended
    assert b.exists() and c.exists()
    assert {s["status"] for s in load_state(root)["stages"].values()} == {"done"}


def test_a_stage_that_exits_0_without_its_outputs_is_a_failure(tmp_path):
    stage = Stage("quiet", "writes nothing", [sys.executable, "-c", "print('hi')"], [tmp_path / "never.txt"])
    with pytest.raises(StageFailed, match="stage 'quiet' failed"):
        run_stages([stage], tmp_path, echo=lambda _: None, stream=False)
    assert "did not write" in (tmp_path / "logs" / "quiet.log").read_text()


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profiles_training_commands_compose(profile, tmp_path):
    """The default profile otherwise runs only in the 25-minute demo: a typo there must fail here, in seconds."""
    from hydra import compose, initialize_config_dir

    stages = build_stages(Options(root=tmp_path, profile=PROFILES[profile], repo=REPO))
    for stage in (s for s in stages if s.name in ("distill", "vision", "speech")):
        overrides = stage.command[2:]  # after python train.py
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        assert cfg.paths.output_dir == str(tmp_path / stage.name), stage.name
        if stage.name == "vision" and profile == "default":
            assert cfg.plugin.stem == "conv" and cfg.trainer.max_steps == 400
        if stage.name == "distill":  # every profile distils the assistant (issue 28), the quick one at smoke size
            assert cfg.data._target_.endswith("AssistantDataSpec") and cfg.model.num_hidden_layers in (2, 8)


def test_cli_lists_every_stage_and_refuses_a_bad_override(tmp_path, capsys):
    assert pipeline_main(["--quick", "--out", str(tmp_path / "q"), "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert listed == list(STAGES)
    assert pipeline_main(["--override", "export:--foo=1", "--list"]) == 2
    assert "expected STAGE:KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # listing runs nothing


# --- the real stages on a micro run -----------------------------------------------------------------------------
MICRO_DISTILL = (
    *MICRO_SHAPE,
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "recipe.sample_max_new_tokens=2",
    "quant.ptq.eval_batches=1",
    f"paths.cache_dir={CACHE}",
)


def _micro_options(root: Path, **changes) -> Options:
    corpus = root.parent / "corpus.jsonl"
    if not corpus.exists():
        write_micro_corpus(corpus)
    profile = dataclasses.replace(
        QUICK, distill=(*MICRO_DISTILL, f"data.source={corpus}"), compare_blocks=2, speed_tokens=2
    )
    return Options(root=root, profile=profile, repo=REPO, **changes)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """distill → compare → report through the pipeline's real commands; the plugin stages are left to the e2e test."""
    root = tmp_path_factory.mktemp("pipeline") / "run"
    stages = {s.name: s for s in build_stages(_micro_options(root))}
    run_stages([stages["distill"], stages["compare"], stages["report"]], root, echo=lambda _: None, stream=False)
    return root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_report_numbers_are_the_runs_own(micro_run):
    root = micro_run
    summary = json.loads((root / "distill" / "run_summary.json").read_text())
    compared = json.loads((root / "eval" / "compare.json").read_text())
    report = (root / "report" / "report.md").read_text()
    for key, label in (("val/ppl", "val/ppl (student)"), ("val/kl_to_teacher", "val/kl_to_teacher")):
        assert f"| {label} | {fmt(summary[key])} |" in report
    assert f"| {fmt(summary['ptq/top1_agreement_with_float'])} |" in report
    student = compared["models"]["student"]
    assert f"| student (fp32) | {fmt(student['params'])} |" in report
    assert f"| {fmt(student['ppl'])} | {fmt(student['kl_to_teacher'])} |" in report
    assert check_report_cells(root) >= 20  # every sourced cell, tables of both files
    assert (root / "report" / "distill.png").stat().st_size > 5000
    assert "<table>" in (root / "report" / "report.html").read_text()
    assert "Not run yet (stages `vision`, `speech`)" in report  # a partial run still reports


def test_a_failing_stage_keeps_earlier_outputs_and_the_rerun_skips_them(micro_run):
    root = micro_run
    kept = [root / "distill" / "run_summary.json", root / "distill" / "student" / "model.safetensors"]
    before = {p: _digest(p) for p in kept}
    stages = {s.name: s for s in build_stages(_micro_options(root, overrides=(("vision", "recipe.stage=bogus"),)))}
    lines: list[str] = []
    with pytest.raises(StageFailed) as failed:
        run_stages([stages["distill"], stages["vision"]], root, echo=lines.append, stream=False)
    assert failed.value.stage == "vision" and failed.value.log == root / "logs" / "vision.log"
    assert "recipe.stage='bogus'" in str(failed.value)  # the recipe's own message, in the tail shown
    assert lines[0].startswith("[1/2 distill] complete already")
    assert _runs(root / "logs" / "distill.log") == 1
    assert {p: _digest(p) for p in kept} == before
    assert load_state(root)["stages"]["vision"]["status"] == "failed"
