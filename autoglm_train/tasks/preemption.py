"""Preemption and lost ranks: SIGTERM (or SLURM's ``--signal`` warning) = save a complete checkpoint and exit; a rank
that loses a peer exits at once with one line naming it.

What Lightning 2.6 offers and why most of it is not used here (read from ``lightning/pytorch``):

* ``_SignalConnector`` installs a SIGTERM handler that broadcasts a tensor from inside the signal handler (a
  collective issued at a random point of the step, mismatched with the step's own collectives) and then raises
  ``SIGTERMException``, a ``SystemExit`` with status 0, without saving anything. :class:`Preemption` replaces that
  handler once training starts; Lightning's per-step broadcast of its own flag stays (always 0) and costs nothing.
* ``SLURMEnvironment(auto_requeue=True)`` saves ``hpc_ckpt_N.ckpt`` *inside* the SIGUSR1 handler (mid-step, and a
  collective save on only the ranks that got the signal, which hangs ZeRO-3/FSDP) and then runs
  ``scontrol requeue``. :func:`cluster_environment_plugins` therefore builds ``SLURMEnvironment(auto_requeue=False)``
  (Lightning's rank/address discovery unchanged), and :class:`Preemption` requeues the same way Lightning does, once
  the checkpoint is complete.
* ``ModelCheckpoint`` writes the preemption checkpoint (its own top-k save, same name pattern, same rotation), so the
  saved callback state, resume and :mod:`autoglm_train.utils.resume` treat it like any periodic checkpoint.

The flow: a signal only sets a flag. At the end of every optimizer step all ranks all-reduce (max) that flag, so
every rank stops after the same step even when only one process got the signal (``kill`` of the launcher, Kubernetes
signalling PID 1). They write one checkpoint together (all shards, ``COMPLETE`` last), wait for each other and exit
with :data:`PREEMPTED_EXIT_CODE` (128 + SIGTERM: what SLURM, Kubernetes and Kubeflow's ``ExitCode`` policy read as
"terminated, retry"). Ranks started by Lightning's own launcher exit 0 instead: its child-process observer SIGKILLs
the launching rank when a child exits non-zero, which would turn a clean stop into a kill.

Lost ranks: the collective timeout (``fault_tolerance.collective_timeout_s``, set on every process group when training
starts; the rendezvous before it keeps ``rendezvous_timeout_s``, since ranks may still be loading a teacher) bounds
every wait; with gloo a SIGKILLed peer usually fails the next collective at once ("Connection closed by
peer"). Each rank writes ``<output_dir>/.ranks/rank<N>.json`` (host, pid) and touches it every second; when a
collective fails, :meth:`Preemption.on_exception` names the ranks whose process is gone (same host) or whose heartbeat
stopped (other hosts), prints one ``error: ...`` line and ends the process with :data:`LOST_RANK_EXIT_CODE` without
Lightning's teardown (which would wait on the dead peer). Checkpoints written so far are complete or carry no marker,
so nothing half-written is picked at resume.

Not done: a signal that arrives before training starts (teacher loading, data) or after it ends (final validation,
student export) gets the default action; the newest complete checkpoint is then the resume point, as after a kill.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from autoglm_train.utils.processes import pid_alive

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143
"""Exit status after a preemption save: 128 + SIGTERM, which schedulers read as "terminated; requeue/retry"."""
LOST_RANK_EXIT_CODE = 75
"""Exit status of a rank whose peer was lost (EX_TEMPFAIL: retry); a config error stays 2, a crash 1."""
RANKS_DIR = ".ranks"
_LAUNCHER_PID_ENV = "AUTOGLM_LAUNCHER_PID"
# Words torch/gloo/NCCL use when a collective or the store fails because a peer went away or stopped answering.
_DIST_FAILURE_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "gloo",
    "nccl",
    "socket",
    "connection refused",
)


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is complete; its ``code`` is the exit status."""


def signal_by_name(name: str | int) -> signal.Signals:
    """``"SIGTERM"``/``"TERM"``/``15`` -> ``signal.SIGTERM``; one-line error naming the valid ones otherwise."""
    if isinstance(name, int):
        return signal.Signals(name)
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"fault_tolerance.signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None


def mark_launcher() -> None:
    """Remember this process as the one that may launch the local ranks (children inherit the variable).

    A rank that Lightning's launcher started keeps its parent's mark. Any other process takes the mark over, even
    when its parent set one: a test runner or a pipeline that built a ``Preemption`` in-process and then spawns
    ``train.py`` is not a rank launcher, and inheriting its mark would make the real launching rank exit 0.
    """
    if not started_by_lightning_launcher():
        os.environ[_LAUNCHER_PID_ENV] = str(os.getpid())


def _is_local_child_rank() -> bool:
    """Lightning's subprocess launcher gives each child it starts ``LOCAL_RANK`` >= 1; the launching rank is 0."""
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0")


def started_by_lightning_launcher() -> bool:
    """True in a rank that Lightning's subprocess launcher started (its parent is the launching rank)."""
    mark = os.environ.get(_LAUNCHER_PID_ENV)
    return mark not in (None, str(os.getpid())) and str(os.getppid()) == mark and _is_local_child_rank()


def cluster_environment_plugins() -> list[Any]:
    """Under SLURM: Lightning's ``SLURMEnvironment`` without its in-handler save and requeue (see module doc)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def set_collective_timeout(seconds: float) -> int:
    """Give every process group of this rank (the world and any the engine created, e.g. DeepSpeed's data-parallel
    clone of it) ``seconds`` as its collective timeout; returns how many groups were set.

    The strategy's own timeout also bounds the rendezvous, where a rank may still be loading a 9B teacher, so it stays
    long (``fault_tolerance.rendezvous_timeout_s``); once every rank is training, a wait this long means a lost peer.
    """
    from torch.distributed import distributed_c10d as c10d

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    timeout = timedelta(seconds=seconds)
    groups = [pg for pg in c10d._world.pg_map if not c10d._rank_not_in_group(pg)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def _looks_distributed(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        dist_error = getattr(torch.distributed, "DistError", None)
        if dist_error is not None and isinstance(seen, dist_error):
            return True
        text = str(seen).lower()
        if any(word in text for word in _DIST_FAILURE_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Heartbeat:
    """This rank's file under ``<output_dir>/.ranks``: host and pid, its mtime touched every ``interval`` seconds."""

    def __init__(self, directory: Path, rank: int, interval: float) -> None:
        self.directory, self.rank, self.interval = directory, rank, interval
        self.path = directory / f"rank{rank}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid()}))
        os.replace(tmp, self.path)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-rank{self.rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.path)
            except OSError:  # the directory went away (run cleaned up); nothing to report to
                return

    def stop(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)

    def lost_peers(self, world_size: int) -> list[str]:
        """``"rank R (pid P on H): why"`` for each peer that is gone; waits up to 3 beats for other hosts."""
        host = socket.gethostname()
        lost: dict[int, str] = {}
        pending: dict[int, dict[str, Any]] = {}
        for rank in range(world_size):
            if rank == self.rank:
                continue
            path = self.directory / f"rank{rank}.json"
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                lost[rank] = f"rank {rank}: no heartbeat file"
                continue
            where = f"pid {info['pid']} on {info['host']}"
            if info["host"] == host and not pid_alive(int(info["pid"])):
                lost[rank] = f"rank {rank} ({where}) is gone"
            else:
                pending[rank] = {**info, "where": where}
        deadline = time.monotonic() + 3 * self.interval
        while pending and time.monotonic() < deadline:
            time.sleep(self.interval / 2)
            for rank, info in list(pending.items()):
                if info["host"] == host and not pid_alive(int(info["pid"])):  # it may take a moment to die
                    lost[rank] = f"rank {rank} ({info['where']}) is gone"
                    del pending[rank]
                    continue
                try:
                    age = time.time() - (self.directory / f"rank{rank}.json").stat().st_mtime
                except OSError:
                    age = float("inf")
                if age > 3 * self.interval:
                    lost[rank] = f"rank {rank} ({info['where']}) stopped answering: no heartbeat for {age:.1f} s"
                    del pending[rank]
        return [lost[r] for r in sorted(lost)]


class Preemption(L.Callback):
    """Save-and-exit on preemption signals, at a step boundary on every rank; name a lost rank and exit.

    Args:
        signals: signals that mean "save and exit" (SIGTERM; SIGUSR1 for ``sbatch --signal=USR1@90``).
        requeue: under SLURM, after a save caused by SLURM's requeue signal (SIGUSR1), global rank 0 runs
            ``scontrol requeue $SLURM_JOB_ID`` (as Lightning's auto-requeue does); SIGTERM is the scheduler's own
            preemption, which requeues the job itself when it was submitted with ``--requeue``.
        heartbeat_s: how often each rank touches its heartbeat file (a peer on another host counts as lost after 3).
        collective_timeout_s: only quoted in the lost-rank line; the strategy's process group enforces it.
    """

    def __init__(
        self,
        signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"),
        requeue: bool = True,
        heartbeat_s: float = 1.0,
        collective_timeout_s: float | None = None,
    ) -> None:
        self.signals = [signal_by_name(s) for s in signals]
        self.requeue = requeue
        self.heartbeat_s = float(heartbeat_s)
        self.collective_timeout_s = collective_timeout_s
        self.received: int = 0
        self._previous: dict[signal.Signals, Any] = {}
        self._heartbeat: _Heartbeat | None = None
        mark_launcher()

    # -- signals ------------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: collectives, I/O and exceptions at an arbitrary point of the step are what breaks a save.
        self.received = self.received or int(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: not the main thread; signals %s keep their handlers", self.signals)
            return
        for sig in self.signals:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.received = 0
        self._install()
        if trainer.world_size > 1:
            self._heartbeat = _Heartbeat(
                Path(trainer.default_root_dir) / RANKS_DIR, trainer.global_rank, self.heartbeat_s
            )
            self._heartbeat.start()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # Lightning's signal connector replaced the SIGTERM handler just before training
        if self.collective_timeout_s and trainer.world_size > 1:
            set_collective_timeout(float(self.collective_timeout_s))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup()

    def _cleanup(self) -> None:
        """Restore the signal handlers and remove this rank's heartbeat (also on the exception path, where Lightning
        calls no ``teardown`` hook)."""
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    # -- the save -----------------------------------------------------------------------------------------------

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The largest signal any rank received (0 = none): every rank gets the same answer at the same step."""
        flag = torch.tensor([self.received], dtype=torch.int64, device=trainer.strategy.root_device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint):
            raise RuntimeError("Preemption needs the run's ModelCheckpoint (trainer_factory.build_trainer adds it)")
        name = signal.Signals(signum).name
        if checkpoint._last_global_step_saved != trainer.global_step:
            # ModelCheckpoint's own top-k save: same name, same rotation, same callback state as a periodic one.
            checkpoint._save_topk_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        path = checkpoint._last_checkpoint_saved
        trainer.strategy.barrier("preemption-saved")  # nobody exits while a rank still writes its shards
        code = PREEMPTED_EXIT_CODE
        if trainer.is_global_zero:
            log.warning(
                "%s: stopped after step %d, complete checkpoint %s; exiting with %d",
                name,
                trainer.global_step,
                path,
                code,
            )
            if signum == getattr(signal, "SIGUSR1", None) and self.requeue:
                _slurm_requeue()
        if started_by_lightning_launcher():
            code = 0  # see module doc: the launching rank reports the preemption
        raise Preempted(code)

    # -- lost ranks ---------------------------------------------------------------------------------------------

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        heartbeat = self._heartbeat
        if isinstance(exception, Preempted) or heartbeat is None or not _looks_distributed(exception):
            self._cleanup()  # a preemption, a single process, a bug or a config error: Lightning's path, traceback kept
            return
        lost = heartbeat.lost_peers(trainer.world_size)
        self._cleanup()
        first = " ".join(str(exception).split())[:200]
        if lost:
            what = "; ".join(lost)
            line = f"error: rank {trainer.global_rank} stops after step {trainer.global_step}: lost {what} ({first})"
        else:
            timeout = f" {self.collective_timeout_s:g} s" if self.collective_timeout_s else ""
            line = (
                f"error: rank {trainer.global_rank} stops after step {trainer.global_step}: a collective failed after"
                f"{timeout} with every peer's process still alive ({first})"
            )
        print(line, file=sys.stderr, flush=True)
        logging.shutdown()
        # Lightning's teardown would wait on the dead peer (barriers, process-group destruction): leave now. Every
        # checkpoint on disk is complete or unmarked, and resume deletes unmarked writes.
        os._exit(LOST_RANK_EXIT_CODE)


def _slurm_requeue() -> None:
    """``scontrol requeue`` this SLURM job (array task included), as Lightning's auto-requeue handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("not a SLURM job: nothing to requeue")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("scontrol not found: SLURM job %s was not requeued", job)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
