"""SafetensorsCheckpointIO and resume: exact round trip, real Lightning resume, atomic saves, nothing unpickled."""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from autoglm_train.utils.checkpoint_io import (
    COMPLETE_FILE,
    TENSORS_FILE,
    TREE_FILE,
    SafetensorsCheckpointIO,
    inspect_checkpoint,
)
from autoglm_train.utils.resume import find_last_checkpoint, resolve_ckpt_path

CKPT_FILES = {COMPLETE_FILE, TENSORS_FILE, TREE_FILE}
MC_KEY = "ModelCheckpoint{'monitor': None, 'mode': 'min'}"


@pytest.fixture
def no_unpickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Make every unpickling entry point fail loudly and record the attempt (in case something swallows it)."""
    calls: list[str] = []

    def forbid(name: str) -> Callable[..., Any]:
        def _raise(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called")

        return _raise

    monkeypatch.setattr(torch, "load", forbid("torch.load"))
    monkeypatch.setattr(pickle, "load", forbid("pickle.load"))
    monkeypatch.setattr(pickle, "loads", forbid("pickle.loads"))
    yield calls
    assert calls == []


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Type-exact deep equality: numpy stays numpy, tuples stay tuples, int keys stay int, NaN equals NaN."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}/{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}/{i}")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected.detach()), where
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype == expected.dtype and np.shape(actual) == np.shape(expected), where
        assert actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, where
        if isinstance(expected, float):
            assert math.copysign(1.0, actual) == math.copysign(1.0, expected), where


def _state_dict_with_tied_weights() -> OrderedDict[str, torch.Tensor]:
    embed = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = embed.weight
    return torch.nn.ModuleDict({"embed": embed, "head": head}).state_dict()


def _everything(hparams: Any) -> dict[str, Any]:
    """A Lightning-shaped checkpoint holding every kind of value the IO must carry."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    exp_avg = torch.randn(3)
    return {
        "epoch": 2,
        "global_step": 6,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": _state_dict_with_tied_weights(),
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(6.0), "exp_avg": exp_avg, "also_exp_avg": exp_avg}},
                "param_groups": [
                    {"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "maximize": False, "params": [0]}
                ],
            }
        ],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": 6, "lr_lambdas": [None], "_is_initial": False}],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}, "is_last_batch": True}},
        "callbacks": {MC_KEY: {"best_model_score": None, "kth_value": torch.tensor(float("inf")), "dirpath": "/x"}},
        "hyper_parameters": hparams,
        "hparams_type": DictConfig,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "scalars": (np.float32(1.5), np.int64(-3), np.bool_(True), np.float16(np.inf), np.str_("hi")),
        },
        "MyDataModule": {"order": np.arange(6, dtype=">i4").reshape(2, 3), "zero_d": np.array(2.5), "cursor": 17},
        "views": {"full": base, "row": base[1], "transposed": base.t(), "empty": torch.empty(0, 3)},
        "dtypes": {
            "bf16": torch.randn(4).to(torch.bfloat16),
            "c128": torch.randn(2, dtype=torch.complex128),
            "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        },
        "floats": [float("inf"), float("-inf"), float("nan"), -0.0, 1e-310, 2**70],
        "misc": {"path": Path("/data/shard-0"), "bytes": b"\x00\xff", "__t__": "reserved key", (1, "a"): "tuple key"},
    }


def test_round_trip_is_exact(tmp_path: Path, no_unpickle: list[str]) -> None:
    io = SafetensorsCheckpointIO()
    hparams = OmegaConf.create({"lr": 1e-3, "model": {"dims": [4, 8], "name": "${oc.env:NOPE_UNSET,tiny}"}})
    ckpt = _everything(hparams)
    path = tmp_path / "epoch=2-step=6.ckpt"

    io.save_checkpoint(ckpt, path)
    loaded = io.load_checkpoint(path)

    expected = {**ckpt, "hyper_parameters": {"lr": 1e-3, "model": {"dims": [4, 8], "name": "tiny"}}}
    assert_same(loaded, expected)
    assert loaded["state_dict"]._metadata == ckpt["state_dict"]._metadata
    # Tied weights and a tensor stored twice come back as one tensor, as they went in.
    assert loaded["state_dict"]["embed.weight"] is loaded["state_dict"]["head.weight"]
    state = loaded["optimizer_states"][0]["state"][0]
    assert state["exp_avg"] is state["also_exp_avg"]
    assert {p.name for p in path.iterdir()} == CKPT_FILES
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_overwrite_replaces_atomically_and_leaves_no_scratch(tmp_path: Path) -> None:
    io = SafetensorsCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(2)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(2)}, path)

    assert torch.equal(io.load_checkpoint(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_unsupported_value_names_its_key_path_and_writes_nothing(tmp_path: Path) -> None:
    io = SafetensorsCheckpointIO()
    path = tmp_path / "bad.ckpt"
    with pytest.raises(TypeError, match=re.escape(f"callbacks/{MC_KEY}/foo")):
        io.save_checkpoint({"callbacks": {MC_KEY: {"foo": object()}}}, path)
    with pytest.raises(TypeError, match="datamodule/rows"):
        io.save_checkpoint({"datamodule": {"rows": np.array([{"a": 1}], dtype=object)}}, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu"), lambda storage, loc: storage, {"a": "b"}])
def test_map_location_forms_load_on_cpu(tmp_path: Path, map_location: Any) -> None:
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2), "a": np.ones(2)}, tmp_path / "x.ckpt")
    loaded = io.load_checkpoint(tmp_path / "x.ckpt", map_location=map_location)
    assert loaded["w"].device.type == "cpu"
    assert isinstance(loaded["a"], np.ndarray)


def test_refuses_pickle_files_and_missing_paths(tmp_path: Path, no_unpickle: list[str]) -> None:
    io = SafetensorsCheckpointIO()
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"global_step": 1}))
    with pytest.raises(ValueError, match=r"legacy\.ckpt is not a safetensors checkpoint directory"):
        io.load_checkpoint(legacy)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        io.load_checkpoint(tmp_path / "missing.ckpt")


# ---------------------------------------------------------------- corruption and crashes


def _save_steps(directory: Path, steps: list[int]) -> dict[int, Path]:
    io = SafetensorsCheckpointIO()
    paths = {}
    for step in steps:
        paths[step] = directory / f"step={step}.ckpt"
        io.save_checkpoint({"global_step": step, "w": torch.full((64,), float(step))}, paths[step])
    return paths


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "no_marker": lambda ckpt: (ckpt / COMPLETE_FILE).unlink(),
    "truncated_tensors": lambda ckpt: _truncate(ckpt / TENSORS_FILE),
    "truncated_tree": lambda ckpt: _truncate(ckpt / TREE_FILE),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_corrupt_newest_is_skipped_and_refused(tmp_path: Path, corrupt: str, caplog: pytest.LogCaptureFixture) -> None:
    paths = _save_steps(tmp_path, [1, 2, 3])
    CORRUPTIONS[corrupt](paths[3])

    with caplog.at_level(logging.WARNING, logger="autoglm_train.utils.resume"):
        assert find_last_checkpoint(tmp_path) == paths[2]
    assert "step=3.ckpt" in caplog.text
    with pytest.raises(ValueError, match=r"step=3\.ckpt is (incomplete|corrupt)"):
        SafetensorsCheckpointIO().load_checkpoint(paths[3])
    with pytest.raises(ValueError, match=r"step=3\.ckpt"):
        resolve_ckpt_path(str(paths[3]), tmp_path)


def test_garbled_tensor_header_is_refused(tmp_path: Path) -> None:
    path = _save_steps(tmp_path, [1])[1]
    with (path / TENSORS_FILE).open("r+b") as f:  # same size, so only the read can tell
        f.seek(8)
        f.write(b"not json")
    with pytest.raises(ValueError, match=r"step=1\.ckpt is corrupt"):
        SafetensorsCheckpointIO().load_checkpoint(path)


@pytest.mark.parametrize("failing_rename", ["move_aside", "move_into_place"])
def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_rename: str):
    io = SafetensorsCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(2)}, path)
    real_replace = os.replace

    def flaky_replace(src: Any, dst: Any) -> None:
        is_target = Path(src).name == "last.ckpt" if failing_rename == "move_aside" else ".tmp-" in Path(src).name
        if is_target:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk gone"):
        io.save_checkpoint({"global_step": 2, "w": torch.ones(2)}, path)
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert find_last_checkpoint(tmp_path) == path
    assert io.load_checkpoint(path)["global_step"] == 1


def test_kill_between_renames_still_finds_previous(tmp_path: Path) -> None:
    """The on-disk state a SIGKILL leaves mid-replace: old one moved aside, new one complete but still temporary."""
    io = SafetensorsCheckpointIO()
    paths = _save_steps(tmp_path, [1, 2])
    last = tmp_path / "last.ckpt"
    os.rename(paths[2], tmp_path / ".last.ckpt.old-0123456789ab")
    os.rename(paths[1], tmp_path / ".last.ckpt.tmp-0123456789ab")

    found = find_last_checkpoint(tmp_path)
    assert found == tmp_path / ".last.ckpt.old-0123456789ab"
    assert io.load_checkpoint(found)["global_step"] == 2

    io.save_checkpoint({"global_step": 3}, last)  # the next save wins; the orphan is ignored from now on
    assert find_last_checkpoint(tmp_path) == last


def test_resolve_ckpt_path(tmp_path: Path) -> None:
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path / "not-yet") is None
    paths = _save_steps(tmp_path, [4, 2])
    assert resolve_ckpt_path("last", tmp_path) == str(paths[4])
    assert resolve_ckpt_path(str(paths[2]), tmp_path) == str(paths[2])
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_remove_checkpoint_handles_dirs_links_and_missing(tmp_path: Path) -> None:
    io = SafetensorsCheckpointIO()
    paths = _save_steps(tmp_path, [1, 2])
    link = tmp_path / "last.ckpt"
    link.symlink_to(paths[2].name)
    io.remove_checkpoint(link)
    io.remove_checkpoint(paths[1])
    io.remove_checkpoint(tmp_path / "gone.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["step=2.ckpt"]


# ---------------------------------------------------------------- real Lightning


class _Regression(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin = torch.nn.Linear(3, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(ckpt_dir: Path, max_steps: int, ckpt_path: str | None = None, **ckpt_kwargs: Any) -> L.LightningModule:
    """Two batches per epoch, same init and data every call, so runs are comparable bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    model = _Regression()
    trainer = L.Trainer(
        plugins=[SafetensorsCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, **ckpt_kwargs)],
        max_steps=max_steps,
        accelerator="cpu",
        default_root_dir=ckpt_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_lightning_resume_matches_uninterrupted_run(tmp_path: Path, no_unpickle: list[str]) -> None:
    full = _fit(tmp_path / "full", max_steps=6, save_top_k=-1, save_last=True)
    names = {"epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt", "last.ckpt"}
    assert {p.name for p in (tmp_path / "full").iterdir()} == names
    assert all({f.name for f in (tmp_path / "full" / n).iterdir()} == CKPT_FILES for n in names)
    assert inspect_checkpoint(tmp_path / "full" / "last.ckpt").global_step == 6

    middle = str(tmp_path / "full" / "epoch=0-step=2.ckpt")
    resumed = _fit(tmp_path / "resumed", max_steps=6, ckpt_path=middle, save_top_k=-1)

    for name, param in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], param), name
    assert resumed.trainer.global_step == 6
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == full.trainer.optimizers[0].param_groups[0]["lr"]


def test_lightning_save_last_link_and_rotation(tmp_path: Path, no_unpickle: list[str]) -> None:
    ckpt_dir = tmp_path / "ckpts"
    _fit(ckpt_dir, max_steps=6, save_top_k=1, save_last="link")
    last = ckpt_dir / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (ckpt_dir / "epoch=2-step=6.ckpt").resolve()
    assert {p.name for p in ckpt_dir.iterdir()} == {"epoch=2-step=6.ckpt", "last.ckpt"}  # top-1 rotation removed

    found = resolve_ckpt_path("last", ckpt_dir)
    assert found == str(ckpt_dir / "epoch=2-step=6.ckpt")
    resumed = _fit(ckpt_dir, max_steps=8, ckpt_path=found, save_top_k=1, save_last="link")
    straight = _fit(tmp_path / "straight", max_steps=8, save_top_k=1)
    assert torch.equal(resumed.lin.weight, straight.lin.weight)
    assert find_last_checkpoint(ckpt_dir) == ckpt_dir / "epoch=3-step=8.ckpt"
