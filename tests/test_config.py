"""The Hydra config tree: every option of every group composes and instantiates."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
# Options whose required (???) values a user must give; the test supplies real ones.
REQUIRED = {
    ("teacher", "hf"): ["teacher.path=HuggingFaceTB/SmolLM2-135M-Instruct"],
    ("teacher", "gguf"): [],  # filled in below with the packaged GGUF file
    ("teacher", "server"): ["teacher.url=http://127.0.0.1:8000/v1"],  # no request is sent when it is built
    ("data", "local"): [f"data.source={REPO / 'tests'}"],
    ("data", "chat"): [f"data.path={REPO / 'tests' / 'chat.jsonl'}"],  # instantiating reads nothing
    ("data_mm", "local"): [f"data_mm.source.path={REPO / 'tests' / 'pairs.jsonl'}"],
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_in_design_exists():
    for group in ["recipe", "model", "plugin", "teacher", "data", "trainer", "quant", "logger", "paths", "loss"]:
        assert group in GROUPS, group


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_instantiates(group, teacher_spec, tmp_path):
    for option in _options(group):
        extra = list(REQUIRED.get((group, option), []))
        if (group, option) == ("teacher", "gguf"):
            extra = [f"teacher.path={teacher_spec.resolved_path()}"]
        cfg = _compose([f"{group}={option}", f"paths.root_dir={tmp_path}", *extra])
        node = cfg if group in {"debug", "experiment"} else cfg[group]
        if group == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
            with pytest.raises(InstantiationException) as info:  # Hydra wraps Lightning's "no GPU" error
                instantiate(node)
            assert isinstance(info.value.__cause__, MisconfigurationException)
            continue
        built = instantiate(node, _convert_="all") if node is not None else None
        if group == "plugin" and option != "none":
            from autoglm_train.model.plugin import ModalityPlugin

            assert isinstance(built, ModalityPlugin)
            assert built.hidden_size == cfg.model.hidden_size


def test_every_yaml_starts_with_a_comment_and_a_command():
    for path in CONF.rglob("*.yaml"):
        head = path.read_text().splitlines()[:5]
        comments = [line for line in head if line.startswith("#") and "@package" not in line]
        assert comments, f"{path} must start with a comment saying what it is for"
        assert any("python " in line or "make " in line for line in comments), f"{path}: name the command"


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recipe=nope"], "Could not find 'recipe/nope'"),
        (["trainer.max_stepz=3"], "Could not override 'trainer.max_stepz'"),
        (["plugin=nope"], "Could not find 'plugin/nope'"),
    ],
)
def test_wrong_override_fails_fast_with_hydras_message(args, message):
    start = time.monotonic()
    result = _train(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Available options" in result.stderr or "Key 'max_stepz'" in result.stderr or "max_stepz" in result.stderr
    assert time.monotonic() - start < 20, "must fail before importing torch/transformers"


def test_wrong_override_does_not_import_torch():
    """Composition alone never needs torch: the failure happens before any heavy import."""
    code = (
        "import sys, hydra\n"
        "from hydra import compose, initialize_config_dir\n"
        f"initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3')\n"
        "try:\n    compose(config_name='train', overrides=['recipe=nope'])\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["MissingConfigException", "False"]
