"""Preemption and lost ranks on real 2-process runs (gloo): SIGTERM saves a complete checkpoint and the resumed run
equals an uninterrupted one; a SIGKILLed rank makes the survivor exit within the collective timeout, naming it.

The per-strategy fault tables (ZeRO-2/3, FSDP2, many trials) are ``benchmarks/fault_inject.py --strategy ...``;
the ``slow`` test below runs a small one per strategy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autoglm_train.utils.processes import group_alive
from tests.conftest import CACHE, REPO
from tests.micro_distill import MICRO_SHAPE, write_micro_corpus
from tests.test_scale import needs_deepspeed

STEPS = 4
TIMEOUT_S = 30  # fault_tolerance.collective_timeout_s for these runs


def _overrides(
    root: Path,
    corpus: Path,
    callbacks: list[str],
    trainer: str = "ddp",
    timeout_s: float = TIMEOUT_S,
    steps: int = STEPS,
) -> list[str]:
    return [
        "recipe=distill",
        *MICRO_SHAPE,
        f"data.source={corpus}",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "recipe.checkpoint_every_n_steps=2",
        "recipe.sample_max_new_tokens=2",
        f"paths.root_dir={root}",
        f"paths.cache_dir={CACHE}",
        "run_name=t",
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32",
        f"fault_tolerance.collective_timeout_s={timeout_s}",
        f"callbacks=[{', '.join(callbacks)}]",
    ]


def _run(
    root: Path,
    corpus: Path,
    *callbacks: str,
    limit: float = 300,
    extra: tuple[str, ...] = (),
    trainer: str = "ddp",
    steps: int = STEPS,
) -> tuple[int, str, float]:
    """``train.py`` on 2 CPU processes in its own process group; waits for every rank. Returns (rc, log, end time)."""
    root.mkdir(parents=True, exist_ok=True)
    recorder = f"{{_target_: tests.faults.LossRecorder, path: {root / 'loss.jsonl'}}}"
    log_path = root / f"run-{time.monotonic_ns()}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    overrides = _overrides(root, corpus, [recorder, *callbacks], trainer, steps=steps)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *overrides, *extra],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + limit
        while proc.poll() is None or group_alive(proc.pid):
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"train.py still running after {limit} s: {log_path}")
            time.sleep(0.05)
    return proc.returncode, log_path.read_text(), time.time()


def _losses(root: Path) -> dict[tuple[int, int], float]:
    rows = [json.loads(line) for line in (root / "loss.jsonl").read_text().splitlines()]
    return {(r["rank"], r["step"]): r["loss"] for r in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_micro_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    rc, log, _ = _run(root, corpus)
    assert rc == 0, log[-3000:]
    return root


def test_sigterm_on_two_process_ddp_saves_a_complete_checkpoint_and_resumes_equal(tmp_path, corpus, uninterrupted):
    from autoglm_train.tasks.preemption import PREEMPTED_EXIT_CODE
    from autoglm_train.utils.resume import find_last_checkpoint
    from autoglm_train.utils.sharded_checkpoint import inspect_any_checkpoint

    # SIGTERM reaches rank 0 alone, inside step 3 (after its backward): both ranks finish step 3, save it, exit.
    rc, log, _ = _run(tmp_path, corpus, "{_target_: tests.faults.SignalAtStep, step: 3, rank: 0}")
    assert rc == PREEMPTED_EXIT_CODE, log[-3000:]
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:3000]
    assert "SIGTERM: stopped after step 3, complete checkpoint" in log
    out = tmp_path / "outputs" / "t"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step=000002.ckpt", "step=000003.ckpt"]
    newest = find_last_checkpoint(out / "checkpoints")
    assert newest.name == "step=000003.ckpt" and inspect_any_checkpoint(newest).global_step == 3
    assert not (out / "student").exists()  # a preempted run stops: no half-trained export
    assert sorted(_losses(tmp_path)) == [(r, s) for r in (0, 1) for s in (1, 2, 3)]
    assert not list((out / ".ranks").glob("rank*.json"))  # heartbeats removed on the way out

    rc, log, _ = _run(tmp_path, corpus)
    assert rc == 0, log[-3000:]
    assert "resuming from" in log and "step=000003.ckpt" in log
    want, got = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(got) == sorted(want)
    for key, loss in want.items():
        assert abs(got[key] - loss) <= 1e-5, (key, loss, got[key])
    ref = load_file(str(uninterrupted / "outputs" / "t" / "student" / "model.safetensors"))
    res = load_file(str(out / "student" / "model.safetensors"))
    assert sorted(ref) == sorted(res)
    for name, tensor in ref.items():
        torch.testing.assert_close(res[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkilled_rank_makes_the_survivor_exit_within_the_timeout_naming_it(tmp_path, corpus, victim):
    from autoglm_train.tasks.preemption import LOST_RANK_EXIT_CODE
    from autoglm_train.utils.resume import find_last_checkpoint

    note = tmp_path / "kill.jsonl"
    kill = f"{{_target_: tests.faults.KillAtStep, step: 3, rank: {victim}, mid: true, note: {note}}}"
    rc, log, ended = _run(tmp_path, corpus, kill)
    killed_at = json.loads(note.read_text())["t"]
    assert ended - killed_at < TIMEOUT_S, f"survivor took {ended - killed_at:.1f} s"
    survivor = 1 - victim
    line = f"error: rank {survivor} stops after step"
    assert line in log and f"lost rank {victim} (pid" in log, log[-3000:]
    # the launching process (rank 0) is the survivor, or the victim
    assert rc == (LOST_RANK_EXIT_CODE if victim == 1 else -signal.SIGKILL), log[-3000:]
    # what is on disk is complete: the step-2 checkpoint, nothing newer
    assert find_last_checkpoint(tmp_path / "outputs" / "t" / "checkpoints").name == "step=000002.ckpt"


def test_a_hung_rank_makes_the_survivor_exit_after_the_collective_timeout(tmp_path, corpus):
    """Rank 1 freezes (SIGSTOP) inside step 3: rank 0 waits exactly the collective timeout, then names it."""
    timeout_s = 8
    note = tmp_path / "stop.jsonl"
    stop = f"{{_target_: tests.faults.KillAtStep, step: 3, rank: 1, mid: true, note: {note}, sig: SIGSTOP}}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *_overrides(tmp_path, corpus, [stop], timeout_s=timeout_s)]
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=300)
        ended = time.time()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the frozen rank never exits by itself
    out = (tmp_path / "run.log").read_text()
    waited = ended - json.loads(note.read_text())["t"]
    assert timeout_s <= waited < timeout_s + 20, f"rank 0 left {waited:.1f} s after rank 1 froze"
    assert rc == 75 and "error: rank 0 stops after step" in out and "lost rank 1 (pid" in out, out[-3000:]
    assert "stopped answering: no heartbeat" in out


# -------------------------------------------------------------------------------------------------------------
# in-process: the pieces
# -------------------------------------------------------------------------------------------------------------


def test_lost_peers_names_a_dead_rank_and_spares_a_live_one(tmp_path):
    from autoglm_train.tasks.preemption import _Heartbeat

    mine = _Heartbeat(tmp_path, 0, interval=0.2)
    mine.start()
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    host = socket.gethostname()
    (tmp_path / "rank1.json").write_text(json.dumps({"rank": 1, "host": host, "pid": dead.pid}))
    live = _Heartbeat(tmp_path, 2, interval=0.2)
    live.start()
    try:
        lost = mine.lost_peers(world_size=4)  # rank 3 never wrote a heartbeat
    finally:
        mine.stop()
        live.stop()
    assert lost == [f"rank 1 (pid {dead.pid} on {host}) is gone", "rank 3: no heartbeat file"]


def test_fault_tolerance_config_reaches_the_strategy_and_callbacks(tmp_path):
    from autoglm_train.tasks.preemption import Preemption
    from autoglm_train.tasks.rng_state import RNGStates
    from autoglm_train.tasks.trainer_factory import build_trainer
    from tests.test_distill_recipe import _compose
    from tests.test_distill_recipe import _overrides as base

    ddp = [*base(tmp_path, tmp_path / "c.jsonl", 2), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    assert _compose(ddp).fault_tolerance.collective_timeout_s == 300  # minutes, not torch's 30
    trainer = build_trainer(_compose([*ddp, "fault_tolerance.collective_timeout_s=42"]))
    assert trainer.strategy._timeout == timedelta(seconds=1800)  # the rendezvous; training lowers it to 42 s
    assert next(c for c in trainer.callbacks if isinstance(c, Preemption)).collective_timeout_s == 42
    kinds = [type(c) for c in trainer.callbacks]
    assert Preemption in kinds and RNGStates in kinds
    # the preemption callback runs after the run's own per-step callbacks; ModelCheckpoint (Lightning puts it last)
    # saves nothing after it: the step it stops after is recorded (the 2-process SIGTERM test checks the losses)
    assert kinds.index(Preemption) > kinds.index(RNGStates) and kinds[-1].__name__ == "ModelCheckpoint"
    with pytest.raises(ValueError, match=r"fault_tolerance\.collective_timeout_s=0 must be a positive"):
        build_trainer(_compose([*base(tmp_path, tmp_path / "c.jsonl", 2), "fault_tolerance.collective_timeout_s=0"]))
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        build_trainer(_compose([*base(tmp_path, tmp_path / "c.jsonl", 2), "fault_tolerance.signals=[SIGNOPE]"]))


def test_resume_removes_a_sharded_save_killed_before_its_marker(tmp_path):
    from autoglm_train.utils.resume import resolve_ckpt_path
    from autoglm_train.utils.sharded_checkpoint import write_marker

    done = tmp_path / "step=000002.ckpt"
    (done / "checkpoint").mkdir(parents=True)
    (done / "checkpoint" / "zero_pp_rank_0.pt").write_bytes(b"x" * 8)
    (done / "latest").write_text("checkpoint")
    write_marker(done, "deepspeed", global_step=2, epoch=0, world_size=2)
    killed = tmp_path / "step=000004.ckpt"  # rank 0's shards written, rank 1's and COMPLETE never
    (killed / "checkpoint").mkdir(parents=True)
    (killed / "checkpoint" / "zero_pp_rank_0.pt").write_bytes(b"x" * 8)
    odd = tmp_path / "notes.ckpt"  # not a sharded save: left alone
    odd.mkdir()
    (odd / "README").write_text("mine")
    assert resolve_ckpt_path("last", tmp_path, {"deepspeed"}) == str(done)
    assert not killed.exists() and odd.is_dir()


@needs_deepspeed
def test_zero_checkpoint_refuses_another_world_size_in_one_line(tmp_path):
    from autoglm_train.errors import ConfigValueError
    from autoglm_train.tasks.strategies import DeepSpeedStrategy
    from autoglm_train.utils.sharded_checkpoint import write_marker

    ckpt = tmp_path / "step=000002.ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("checkpoint")
    write_marker(ckpt, "deepspeed", global_step=2, epoch=0, world_size=2)
    strategy = DeepSpeedStrategy(stage=2)  # one process: world size 1
    with pytest.raises(ConfigValueError, match="a ZeRO checkpoint of 2 ranks cannot resume on 1: DeepSpeed reshards"):
        strategy.load_checkpoint(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_on_one_process_with_the_same_loss_curve(tmp_path, corpus, trainer):
    """2 ranks x batch 2 to step 4, then 1 rank x batch 4 (the same global batch) from that checkpoint: steps 5-6 give
    the mean of the two ranks' losses of an uninterrupted 2-process run (DDP: full state; FSDP2: torch DCP reshards
    the 2-rank shards onto 1). ZeRO refuses instead (test_zero_checkpoint_refuses_another_world_size_in_one_line)."""
    import shutil

    straight = tmp_path / "straight"
    rc, log, _ = _run(straight, corpus, trainer=trainer, steps=6)
    assert rc == 0, log[-3000:]
    want = _losses(straight)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "outputs", resumed / "outputs")
    shutil.rmtree(resumed / "outputs" / "t" / "checkpoints" / "step=000006.ckpt")
    shutil.rmtree(resumed / "outputs" / "t" / "student")
    rc, log, _ = _run(resumed, corpus, trainer=trainer, steps=6, extra=("trainer.devices=1", "data.batch_size=4"))
    assert rc == 0, log[-3000:]
    assert "resuming from" in log and "step=000004.ckpt" in log
    got = _losses(resumed)
    assert sorted(got) == [(0, 5), (0, 6)]
    for step in (5, 6):
        mean = (want[(0, step)] + want[(1, step)]) / 2
        assert abs(got[(0, step)] - mean) < 1e-4, (step, got[(0, step)], mean)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        pytest.param("deepspeed_zero2", marks=needs_deepspeed),
        pytest.param("deepspeed_zero3", marks=needs_deepspeed),
        "fsdp",
    ],
)
def test_fault_inject_distributed_strategy(tmp_path, strategy):
    """One trial with one fault of each kind (a rank killed in a step, all ranks killed in the writer, SIGTERM)."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, "benchmarks/fault_inject.py", "--strategy", strategy, "--trials", "1", "--faults", "3"]
    cmd += ["--no-write", "--json", str(out), "--seed", "3"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    numbers = json.loads(out.read_text())
    assert numbers["problems"] == [] and numbers["kills"] + numbers["faults_missed"] == 3
    assert numbers["max_loss_diff"] <= 1e-5 and numbers["max_weight_diff"] <= 1e-6


class _Draws(__import__("lightning").LightningModule):
    """A module whose every step draws from torch's global RNG (as dropout or on-policy sampling do)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.draws: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        noise = torch.rand(1)
        self.draws[self.trainer.global_step + 1] = float(noise)
        return (self.w * (batch.float().mean() + noise)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_draws(root: Path, steps: int, ckpt: str | None = None) -> dict[int, float]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from autoglm_train.tasks.rng_state import RNGStates
    from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO

    L.seed_everything(0)
    module = _Draws()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            RNGStates(),
            ModelCheckpoint(dirpath=root, filename="step={step}", auto_insert_metric_name=False, every_n_train_steps=2),
        ],
        plugins=[SafetensorsCheckpointIO()],
    )
    trainer.fit(module, DataLoader(torch.arange(8), batch_size=1), ckpt_path=ckpt)
    return module.draws


def test_resumed_run_draws_the_random_numbers_of_the_uninterrupted_one(tmp_path):
    straight = _fit_draws(tmp_path / "a", 4)
    _fit_draws(tmp_path / "b", 2)
    resumed = _fit_draws(tmp_path / "b", 4, ckpt=str(tmp_path / "b" / "step=2.ckpt"))
    assert sorted(resumed) == [3, 4]
    assert resumed == {s: straight[s] for s in (3, 4)}  # seed_everything alone would replay steps 1-2's draws
