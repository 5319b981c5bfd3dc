"""trainer=ddp|deepspeed_zero2|deepspeed_zero3|fsdp on 2 CPU processes (gloo), and what they write.

Each run is ``python train.py ... trainer.accelerator=cpu trainer.devices=2``: Lightning starts the second process
itself, exactly as on a GPU node. All strategies must train the same student (same seed, data, global batch), keep
the teacher out of wrapping/sharding/optimizer/checkpoints on every rank, and leave checkpoints that convert to the
HF decoder the run saved.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CACHE, REPO
from tests.test_distill_recipe import _compose, _corpus, _overrides

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is not installed: pip install --no-build-isolation 'autoglm-train[scale]'"
)
STRATEGY_CLASS = {
    "ddp": "DDPStrategy",
    "deepspeed_zero2": "DeepSpeedStrategy",
    "deepspeed_zero3": "DeepSpeedStrategy",
    "fsdp": "FSDP2Strategy",
}
STUDENT_BUILD = {  # how configure_model built the student (autoglm_train.tasks.student_build)
    "ddp": "whole",
    "deepspeed_zero2": "whole",
    "deepspeed_zero3": "zero.Init",  # partitioned as constructed: no rank holds it whole
    "fsdp": "rank0-broadcast",  # whole on rank 0 only, meta elsewhere, then sharded
}
WRAPPER_CLASS = {
    "ddp": "DistributedDataParallel",
    "deepspeed_zero2": "DeepSpeedEngine",
    "deepspeed_zero3": "DeepSpeedEngine",
    "fsdp": "DistillTask",
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _launch(
    root: Path,
    corpus: Path,
    trainer: str,
    steps: int,
    precision: str = "32",
    timeout: int = 420,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``python train.py`` with 2 CPU processes; a probe callback records placement and per-step loss/time."""
    probe = "+callbacks=[{_target_: tests.scale_probe.PlacementProbe, path: %s}]" % (root / "probe.jsonl")
    overrides = [
        *_overrides(root, corpus, steps),
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"trainer.precision={precision}",
        "trainer.limit_val_batches=1",
        probe,
        *extra,
    ]
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
    (root / "stdout.log").write_text(result.stdout + result.stderr)
    return result


def _check_ran(result: subprocess.CompletedProcess) -> str:
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # a child rank that fails after training does not change rank 0's exit code: read its traceback too
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:4000]
    return log


def _probe(root: Path) -> tuple[list[dict], dict[tuple[int, int], float]]:
    rows = [json.loads(line) for line in (root / "probe.jsonl").read_text().splitlines()]
    starts = [r for r in rows if r["event"] == "start"]
    losses = {(r["rank"], r["step"]): r["loss"] for r in rows if r["event"] == "step"}
    return starts, losses


def _check_placement(starts: list[dict], trainer: str, teacher_sharded: bool = False) -> None:
    """The teacher on every rank: whole (or 1/2 of it, ``teacher.shard``), on the rank's device, frozen, outside the
    wrapper/optimizer/state."""
    assert sorted(r["rank"] for r in starts) == [0, 1]
    for r in starts:
        assert r["world_size"] == 2
        assert r["strategy"] == STRATEGY_CLASS[trainer] and r["wrapper"] == WRAPPER_CLASS[trainer], r
        assert r["student_build"] == STUDENT_BUILD[trainer], r
        assert r["teacher_devices"] == [r["student_device"]], r
        assert not r["teacher_in_task_modules"] and not r["teacher_in_wrapper_params"], r
        assert not r["teacher_in_optimizer"] and not r["teacher_requires_grad"], r
        assert r["teacher_ds_partitioned"] == teacher_sharded and not r["teacher_dtensor"], r
        assert r["teacher_numel"] == 134_515_008, r  # SmolLM2-135M
        if teacher_sharded:  # ZeRO-3 keeps 1/2 of each weight per rank (rounded up per tensor)
            assert r["teacher_local_numel"] <= 134_515_008 // 2 + 1_000, r
        else:  # the full teacher on each rank
            assert r["teacher_local_numel"] == 134_515_008, r
        assert r["state_dict_keys_outside_student"] == [], r
    if trainer == "fsdp":
        assert all(r["student_class"].startswith("FSDP") for r in starts)  # only the student is wrapped


def _student(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "outputs" / "t" / "student" / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _check_conversion(root: Path, step: int) -> None:
    """The last checkpoint, converted to an HF decoder, equals the student the run saved."""
    from autoglm_train.model.hf_io import checkpoint_to_hf_decoder

    out = root / "outputs" / "t"
    converted = checkpoint_to_hf_decoder(
        out / "checkpoints" / f"step={step:06d}.ckpt", root / "converted", out / "student"
    )
    _assert_same(load_file(str(converted / "model.safetensors")), _student(root), atol=0.0)


def _check_trains_the_ddp_student(root: Path, ddp_run: Path, trainer: str, teacher_sharded: bool = False) -> None:
    """The run at ``root``: placement as its strategy promises, and DDP's losses and student (same seed, data and
    global batch)."""
    starts, losses = _probe(root)
    _check_placement(starts, trainer, teacher_sharded)
    _assert_ddp_losses(losses, ddp_run)
    _assert_same(_student(root), _student(ddp_run), atol=1e-5)


def _assert_ddp_losses(losses: dict[tuple[int, int], float], ddp_run: Path) -> None:
    """Every (rank, step) loss of the 4-step DDP reference run, within 1e-4."""
    _, ddp_losses = _probe(ddp_run)
    for key, loss in ddp_losses.items():
        assert abs(losses[key] - loss) < 1e-4, (key, loss, losses[key])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, corpus) -> Path:
    """One 2-process DDP run of 4 steps: the reference every sharded strategy must reproduce."""
    root = tmp_path_factory.mktemp("ddp")
    _check_ran(_launch(root, corpus, "ddp", steps=4))
    return root


# ---------------------------------------------------------------------------------------------------------------
# 2-process runs
# ---------------------------------------------------------------------------------------------------------------


def test_ddp_two_processes_distill(ddp_run):
    starts, losses = _probe(ddp_run)
    _check_placement(starts, "ddp")
    assert sorted(losses) == [(r, s) for r in (0, 1) for s in range(1, 5)]
    assert losses[(0, 1)] != losses[(1, 1)]  # each rank trained on its own shard of the batch
    out = ddp_run / "outputs" / "t"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 4 and 0.0 <= summary["val/teacher_top1_agreement"] <= 1.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step=000002.ckpt", "step=000004.ckpt"]
    _check_conversion(ddp_run, 4)


@needs_deepspeed
def test_zero2_two_processes_trains_the_ddp_student_and_converts(tmp_path, corpus, ddp_run):
    _check_ran(_launch(tmp_path, corpus, "deepspeed_zero2", steps=4))
    _check_trains_the_ddp_student(tmp_path, ddp_run, "deepspeed_zero2")
    ckpt = tmp_path / "outputs" / "t" / "checkpoints" / "step=000004.ckpt"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "latest").is_file()
    _check_conversion(tmp_path, 4)


@needs_deepspeed
def test_zero3_builds_the_student_partitioned_and_trains_the_ddp_student(tmp_path, corpus, ddp_run):
    """ZeRO-3 partitions the student while it is constructed, yet it starts from the DDP student's weights (same
    seed), trains the same steps, and its int8 form is written after training (``quant=ptq_int8``)."""
    _check_ran(_launch(tmp_path, corpus, "deepspeed_zero3", steps=4, extra=("quant=ptq_int8",)))
    _check_trains_the_ddp_student(tmp_path, ddp_run, "deepspeed_zero3")
    out = tmp_path / "outputs" / "t"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["ptq/weight_bytes_ratio"] < 0.5 and summary["ptq/top1_agreement_with_float"] > 0.5, summary
    assert (out / "student_int8").is_dir()
    _check_conversion(tmp_path, 4)


@needs_deepspeed
def test_zero3_shards_the_teacher_and_trains_the_ddp_student(tmp_path, corpus, ddp_run):
    """``teacher.shard=true``: each rank holds half the teacher, gathered layer by layer; the same losses as DDP."""
    _check_ran(_launch(tmp_path, corpus, "deepspeed_zero3", steps=4, extra=("teacher.shard=true",)))
    _check_trains_the_ddp_student(tmp_path, ddp_run, "deepspeed_zero3", teacher_sharded=True)
    summary = json.loads((tmp_path / "outputs" / "t" / "run_summary.json").read_text())
    ddp_summary = json.loads((ddp_run / "outputs" / "t" / "run_summary.json").read_text())
    assert abs(summary["val/kl_to_teacher"] - ddp_summary["val/kl_to_teacher"]) < 1e-4  # the teacher ran in val too


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer",
    [
        pytest.param("deepspeed_zero2", marks=needs_deepspeed),
        pytest.param("deepspeed_zero3", marks=needs_deepspeed),
        "fsdp",
    ],
)
def test_sharded_save_resume_convert(tmp_path, corpus, ddp_run, trainer):
    """6 steps straight; then the same run cut back to its step-4 checkpoint and resumed: same losses, same student."""
    straight = tmp_path / "straight"
    _check_ran(_launch(straight, corpus, trainer, steps=6))
    starts, want = _probe(straight)
    _check_placement(starts, trainer)
    _check_conversion(straight, 6)
    _assert_ddp_losses(want, ddp_run)  # the first 4 steps are the DDP run's (same seed, data, global batch)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "outputs", resumed / "outputs")
    out = resumed / "outputs" / "t"
    shutil.rmtree(out / "checkpoints" / "step=000006.ckpt")
    shutil.rmtree(out / "student")
    (out / "run_summary.json").unlink()
    log = _check_ran(_launch(resumed, corpus, trainer, steps=6))
    assert "resuming from" in log and "step=000004.ckpt" in log
    _, got = _probe(resumed)
    assert sorted(got) == [(r, s) for r in (0, 1) for s in (5, 6)]
    for key, loss in got.items():
        assert abs(want[key] - loss) < 1e-5, (key, want[key], loss)
    _assert_same(_student(resumed), _student(straight), atol=1e-6)
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 6


@pytest.mark.slow
@needs_deepspeed
def test_zero3_bf16_mixed_saves_the_fp32_master_student(tmp_path, corpus):
    """bf16-mixed = DeepSpeed's bf16 engine: 16-bit weights trained from fp32 masters; the student is the masters."""
    _check_ran(_launch(tmp_path, corpus, "deepspeed_zero3", steps=4, precision="bf16-mixed"))
    starts, losses = _probe(tmp_path)
    _check_placement(starts, "deepspeed_zero3")
    assert all(v == v for v in losses.values())  # finite (not NaN)
    assert {t.dtype for t in _student(tmp_path).values()} == {torch.float32}
    _check_conversion(tmp_path, 4)


@pytest.mark.parametrize(
    "trainer",
    [
        "ddp",
        pytest.param("deepspeed_zero2", marks=[needs_deepspeed, pytest.mark.slow]),
        pytest.param("deepspeed_zero3", marks=[needs_deepspeed, pytest.mark.slow]),
    ],
)
def test_add_modality_two_processes(trainer, tmp_path, student_tok):
    """recipe=add_modality on 2 ranks: the frozen decoder rides along unchanged, rank 0 alone writes the plugin."""
    from tests.mm_fixtures import DIGITS, TINY_RUN, TINY_VISION, save_micro_decoder

    decoder = save_micro_decoder(tmp_path / "decoder", student_tok)
    before = load_file(str(decoder / "model.safetensors"))
    overrides = ["recipe=add_modality", f"paths.root_dir={tmp_path}", f"paths.cache_dir={CACHE}", f"decoder={decoder}"]
    overrides += [*TINY_VISION, *DIGITS, *TINY_RUN, f"trainer={trainer}", "trainer.accelerator=cpu"]
    overrides += ["trainer.devices=2"]
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, "trainer.precision=32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    _check_ran(result)
    out = tmp_path / "outputs" / "add_modality" / "vision"
    assert (out / "plugins" / "vision" / "model.safetensors").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["text_only_unchanged"]
    if trainer == "ddp":
        from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO

        ckpt = SafetensorsCheckpointIO().load_checkpoint(out / "checkpoints" / "step=000002.ckpt")
        keys = list(ckpt["state_dict"])
        assert keys and all(k.startswith("model.plugins.vision.") for k in keys), sorted(keys)[:5]
    _assert_same(load_file(str(decoder / "model.safetensors")), before, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------
# in-process: configs, strategies, markers, resume selection
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_trainer_configs_compose_multi_node_ready(trainer, tmp_path):
    cfg = _compose([*_overrides(tmp_path, tmp_path / "c.jsonl", 2), f"trainer={trainer}"])
    assert cfg.trainer.num_nodes == 1 and "devices" in cfg.trainer
    lines = (REPO / "conf" / "trainer" / f"{trainer}.yaml").read_text().splitlines()
    assert lines[0].startswith("#") and any("python train.py" in line for line in lines[:5])
    if trainer in ("deepspeed_zero2", "deepspeed_zero3"):
        assert cfg.trainer.strategy.stage == int(trainer[-1])
        assert {"offload_optimizer", "exclude_frozen_parameters"} <= set(cfg.trainer.strategy)
    if trainer == "deepspeed_zero3":
        assert "offload_parameters" in cfg.trainer.strategy


@pytest.mark.parametrize(
    ("trainer", "fmt"),
    [
        ("ddp", "autoglm-train/lightning-checkpoint"),
        pytest.param("deepspeed_zero2", "deepspeed", marks=needs_deepspeed),
        pytest.param("deepspeed_zero3", "deepspeed", marks=needs_deepspeed),
        ("fsdp", "torch-dcp"),
    ],
)
def test_cpu_trainers_build_with_their_checkpoint_format(trainer, fmt, tmp_path, monkeypatch):
    from autoglm_train.tasks.trainer_factory import build_trainer, checkpoint_format

    for name in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR"):  # set by build_trainer: restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    overrides = [*_overrides(tmp_path, tmp_path / "c.jsonl", 2), f"trainer={trainer}", "trainer.accelerator=cpu"]
    trainer_obj = build_trainer(_compose([*overrides, "trainer.devices=2", "trainer.precision=32"]))
    assert type(trainer_obj.strategy).__name__ == STRATEGY_CLASS[trainer]
    assert checkpoint_format(trainer_obj) == fmt
    assert trainer_obj.num_devices == 2
    if fmt == "deepspeed":
        assert os.environ["DS_ACCELERATOR"] == "cpu"
        assert os.environ["TORCH_EXTENSIONS_DIR"].startswith(str(CACHE.resolve() / "torch_extensions"))


def test_deepspeed_on_cpu_refuses_another_ds_accelerator(monkeypatch):
    from autoglm_train.tasks.strategies import use_deepspeed_cpu_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda"):
        use_deepspeed_cpu_accelerator()


def test_missing_deepspeed_fails_with_the_extra_to_install(tmp_path, monkeypatch):
    from autoglm_train.tasks import trainer_factory

    real = importlib.util.find_spec
    monkeypatch.setattr(trainer_factory.importlib.util, "find_spec", lambda n: None if n == "deepspeed" else real(n))
    cfg = _compose(
        [*_overrides(tmp_path, tmp_path / "c.jsonl", 2), "trainer=deepspeed_zero2", "trainer.accelerator=cpu"]
    )
    with pytest.raises(ImportError, match=r"autoglm-train\[scale\]"):
        trainer_factory.prepare_strategy(cfg)


def _fake_sharded(path: Path, fmt: str, step: int) -> Path:
    from autoglm_train.utils.sharded_checkpoint import write_marker

    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "shard_0.pt").write_bytes(b"x" * 10)
    (path / ("latest" if fmt == "deepspeed" else ".metadata")).write_text("checkpoint")
    write_marker(path, fmt, global_step=step, epoch=0, world_size=2)
    return path


def test_resume_picks_complete_sharded_checkpoints_of_the_trainers_format(tmp_path, caplog):
    from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO
    from autoglm_train.utils.resume import find_last_checkpoint, resolve_ckpt_path

    ckpts = tmp_path / "checkpoints"
    _fake_sharded(ckpts / "step=000002.ckpt", "deepspeed", 2)
    newest = _fake_sharded(ckpts / "step=000004.ckpt", "deepspeed", 4)
    truncated = _fake_sharded(ckpts / "step=000006.ckpt", "deepspeed", 6)
    (truncated / "checkpoint" / "shard_0.pt").write_bytes(b"x" * 3)
    unmarked = _fake_sharded(ckpts / "step=000008.ckpt", "deepspeed", 8)
    (unmarked / "COMPLETE").unlink()  # a save killed before every rank finished
    SafetensorsCheckpointIO().save_checkpoint({"global_step": 10, "state_dict": {}}, ckpts / "step=000010.ckpt")

    assert find_last_checkpoint(ckpts, {"deepspeed"}) == newest
    assert "step=000006.ckpt: Checkpoint" in caplog.text and "corrupt" in caplog.text
    assert find_last_checkpoint(ckpts) == ckpts / "step=000010.ckpt"  # any format: the safetensors one is newest
    assert find_last_checkpoint(ckpts, {"torch-dcp"}) is None
    with pytest.raises(ValueError, match="is a deepspeed checkpoint; this trainer reads"):
        resolve_ckpt_path(newest, ckpts, {"autoglm-train/lightning-checkpoint"})
    with pytest.raises(ValueError, match="incomplete"):
        resolve_ckpt_path(unmarked, ckpts)
    # "last" first removes the unmarked save (the resumed run rewrites that step), then picks the newest complete one
    assert resolve_ckpt_path("last", ckpts, {"deepspeed"}) == str(newest)
    assert not unmarked.exists() and newest.is_dir() and truncated.is_dir()


def test_checkpoint_with_a_teacher_is_refused():
    from autoglm_train.utils.sharded_checkpoint import assert_student_only

    assert_student_only(["student.model.embed_tokens.weight", "student.lm_head.weight"])
    with pytest.raises(AssertionError, match=r"outside 'student\.'"):
        assert_student_only(["student.lm_head.weight", "_teacher.0.model.embed_tokens.weight"])


def test_activation_checkpointing_reaches_a_student_built_in_configure_model():
    """A real fit: the task builds its student in configure_model, the callback then switches checkpointing on it."""
    import lightning as L
    from torch.utils.data import DataLoader

    from autoglm_train.distill.kd_loss import KDLoss
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.tasks.distill_task import DistillTask
    from autoglm_train.tasks.recompute import ActivationCheckpointing
    from tests.conftest import micro_spec

    teacher = build_decoder(micro_spec(), 128, 0)
    task = DistillTask(
        lambda: build_decoder(micro_spec(), 128, 0, device=None, dtype=None),
        teacher,
        KDLoss(chunk_size=16),
        torch.optim.AdamW,
        None,
        128,
    )
    assert task.student is None and task.student_build == "pending"
    rows = torch.randint(0, 128, (4, 16))
    seen: dict[str, bool] = {}

    class GradsSeen(L.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            seen["all_grads"] = all(p.grad is not None for p in pl_module.student.parameters())
            seen["recomputed"] = all(m.gradient_checkpointing for m in pl_module.student.model.layers)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ActivationCheckpointing(), GradsSeen()],
    )
    trainer.fit(task, DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=2))
    assert task.student_build == "whole" and trainer.global_step == 1
    assert seen == {"all_grads": True, "recomputed": True}
    assert not any(getattr(m, "gradient_checkpointing", False) for m in teacher.modules())
