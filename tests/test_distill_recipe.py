"""recipe=distill end to end on tiny shapes: real teacher, real data, resumable after SIGKILL."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import CACHE, REPO
from tests.micro_distill import MICRO_SHAPE, write_micro_corpus


def _corpus(tmp_path: Path) -> Path:
    """A small real corpus (12 Shakespeare documents) written per test."""
    return write_micro_corpus(tmp_path / "corpus.jsonl")


def _overrides(tmp_path: Path, corpus: Path, steps: int) -> list[str]:
    return [
        "recipe=distill",
        *MICRO_SHAPE,
        f"data.source={corpus}",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "recipe.checkpoint_every_n_steps=2",
        "recipe.sample_max_new_tokens=4",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={CACHE}",
        "run_name=t",
    ]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_distill_run_writes_a_loadable_student_and_metrics(tmp_path):
    from recipes.distill import run

    cfg = _compose(_overrides(tmp_path, _corpus(tmp_path), steps=4))
    summary = run(cfg)
    out = tmp_path / "outputs" / "t"
    assert summary["global_step"] == 4
    for key in ("val/loss", "val/ppl", "val/teacher_top1_agreement", "val/kl_to_teacher"):
        assert key in summary and summary[key] == summary[key], key  # present and not NaN
    assert 0.0 <= summary["val/teacher_top1_agreement"] <= 1.0
    # the student is a plain HF directory: transformers alone loads it, logits match the trained weights
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert type(student).__name__ == "GlmForCausalLM"
    assert not list((out / "student").glob("*.bin")) and (out / "student" / "model.safetensors").is_file()
    # the teacher never enters a checkpoint
    ckpts = sorted((out / "checkpoints").glob("step=*.ckpt"))
    assert ckpts, "periodic checkpoints written"
    keys = load_file(str(ckpts[-1] / "tensors.safetensors")).keys()
    assert keys and not any("teacher" in k for k in keys)
    assert json.loads((out / "run_summary.json").read_text())["student_params"] == summary["student_params"]
    header = next((out / "logs").glob("version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    for metric in ("train/loss", "train/kd_loss", "val/loss", "val/ppl", "val/teacher_top1_agreement"):
        assert metric in header, metric


def _train_subprocess(tmp_path: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *overrides, *extra], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out: dict[int, float] = {}
    for row in rows:
        out.setdefault(row["step"], row["loss"])  # a re-run step after resume must match its first record
        assert abs(out[row["step"]] - row["loss"]) <= 1e-5, row
    return out


def test_sigkill_mid_run_then_resume_gives_the_same_losses(tmp_path):
    corpus = _corpus(tmp_path)
    steps = 7
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    rec = "+callbacks=[{_target_: tests.faults.LossRecorder, path: %s}]"
    a = _train_subprocess(straight, _overrides(straight, corpus, steps), rec % (straight / "loss.jsonl"))
    assert a.returncode == 0, a.stderr[-3000:]

    killed = _train_subprocess(
        broken,
        _overrides(broken, corpus, steps),
        "+callbacks=[{_target_: tests.faults.LossRecorder, path: %s}, {_target_: tests.faults.KillAtStep, step: 5}]"
        % (broken / "loss.jsonl"),
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (broken / "outputs" / "t" / "student").exists()
    resumed = _train_subprocess(broken, _overrides(broken, corpus, steps), rec % (broken / "loss.jsonl"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in (resumed.stdout + resumed.stderr).lower()

    want, got = _losses(straight / "loss.jsonl"), _losses(broken / "loss.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-5, (step, want[step], got[step])
    a_w = load_file(str(straight / "outputs" / "t" / "student" / "model.safetensors"))
    b_w = load_file(str(broken / "outputs" / "t" / "student" / "model.safetensors"))
    for k in a_w:
        torch.testing.assert_close(a_w[k], b_w[k], rtol=0, atol=1e-6)


def test_distill_from_offline_teacher_topk_cache(tmp_path, caplog):
    import logging

    from recipes.distill import run

    overrides = _overrides(tmp_path, _corpus(tmp_path), steps=3)
    overrides = [o for o in overrides if not o.startswith("paths.cache_dir")] + [
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.cache_dir={CACHE / 'teachers'}",
        "recipe.teacher_cache.enabled=true",
        "recipe.teacher_cache.k=8",
        "recipe.teacher_cache.shard_blocks=16",
        "logger=wandb",
        "logger.mode=offline",
    ]
    teacher_in_training = []

    def spot_teacher_in_training_step(module, args, output):
        if type(module).__name__ == "LlamaModel":  # the teacher's backbone (the student is a GLM)
            teacher_in_training.extend(f.function for f in inspect.stack() if f.function == "training_step")

    hook = torch.nn.modules.module.register_module_forward_hook(spot_teacher_in_training_step)
    try:
        with caplog.at_level(logging.INFO):
            summary = run(_compose(overrides))
    finally:
        hook.remove()
    assert summary["global_step"] == 3
    assert teacher_in_training == []  # training read the cache; the teacher ran for the cache and validation only
    assert "teacher top-k cache: shard 1/" in caplog.text
    assert list((tmp_path / "cache" / "teacher_topk").glob("topk-k8-*/meta.json"))
    assert 0.0 <= summary["val/teacher_top1_agreement"] <= 1.0
    assert list((tmp_path / "outputs" / "t" / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B got the run
