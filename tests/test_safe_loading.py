"""Nothing we load can run code: weights are safetensors only, no pickles, remote code only when configured.

An AST audit of the shipped code (``autoglm_train``, ``recipes``, ``tools``, ``train.py``), plus real loads of a
decoder directory that holds only a pickled ``pytorch_model.bin``.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import REPO

SCANNED = [REPO / "autoglm_train", REPO / "recipes", REPO / "tools", REPO / "train.py"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _sources() -> list[tuple[str, ast.Module]]:
    files = [p for root in SCANNED for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    assert len(files) > 50
    return [(str(p.relative_to(REPO)), ast.parse(p.read_text(), str(p))) for p in files]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def audit(sources: list[tuple[str, ast.Module]]) -> list[str]:
    """Every unsafe load in ``sources``, as ``file:line: what``."""
    found = []
    for name, tree in sources:
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
            if not isinstance(node, ast.Call):
                continue
            func = _dotted(node.func)
            if func.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            if func.endswith("torch.save"):
                found.append(f"{where}: torch.save writes a pickle; use safetensors")
            if func.split(".")[-1] == "load" and func.split(".")[0] in {"np", "numpy"} and _kw(node, "allow_pickle"):
                found.append(f"{where}: np.load with allow_pickle")
            remote = _kw(node, "trust_remote_code")
            if remote is not None and not isinstance(remote, ast.Attribute):
                found.append(f"{where}: trust_remote_code must come from a config field, got {ast.unparse(remote)}")
            receiver = func.rsplit(".", 1)[0]
            is_model = "Model" in receiver or receiver.endswith(("ForCausalLM", "LM"))
            # without use_safetensors, transformers falls back to a pickled pytorch_model.bin; GGUF files are parsed
            safe = _is_true(_kw(node, "use_safetensors")) or _kw(node, "gguf_file") is not None
            if func.endswith(".from_pretrained") and is_model and not safe:
                found.append(f"{where}: {func} without use_safetensors=True")
    return found


def test_shipped_code_loads_nothing_unsafely() -> None:
    assert audit(_sources()) == []


def test_the_audit_catches_each_unsafe_pattern() -> None:
    bad = """
import pickle
from joblib import load
torch.load(path)
torch.load(path, weights_only=False)
torch.save(model.state_dict(), path)
np.load(path, allow_pickle=True)
AutoModelForCausalLM.from_pretrained(path)
AutoTokenizer.from_pretrained(path, trust_remote_code=True)
"""
    good = """
torch.load(path, weights_only=True)
AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=spec.trust_remote_code)
AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
AutoTokenizer.from_pretrained(path)
AutoConfig.from_pretrained(path)
"""
    assert len(audit([("bad.py", ast.parse(bad))])) == 8
    assert audit([("good.py", ast.parse(good))]) == []


def test_remote_code_is_off_unless_configured(teacher_spec) -> None:
    assert teacher_spec.trust_remote_code is False
    for yaml in sorted((REPO / "conf").rglob("*.yaml")):
        assert "trust_remote_code: true" not in yaml.read_text().lower(), yaml
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for teacher in ("smollm2_135m", "hf", "gguf"):
            cfg = compose(config_name="train", overrides=[f"teacher={teacher}"])
            assert cfg.teacher.get("trust_remote_code", False) is False, teacher


@pytest.fixture
def pickled_decoder_dir(micro_decoder, student_tok, tmp_path: Path) -> Path:
    """A real decoder directory whose weights are only a pickled pytorch_model.bin."""
    directory = tmp_path / "pickled"
    micro_decoder.config.save_pretrained(directory)
    student_tok.save_pretrained(directory)
    torch.save(micro_decoder.state_dict(), directory / "pytorch_model.bin")  # what an old or hostile checkpoint holds
    assert (directory / "pytorch_model.bin").is_file() and not list(directory.glob("*.safetensors"))
    return directory


@pytest.fixture
def no_unpickle(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def forbid(*args, **kwargs):
        calls.append("torch.load")
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbid)
    monkeypatch.setattr(pickle, "load", forbid)
    return calls


def test_pickled_decoder_dir_is_refused_without_unpickling(pickled_decoder_dir: Path, no_unpickle) -> None:
    from autoglm_train.engine.bundle import read_bundle
    from autoglm_train.engine.engine import Engine
    from autoglm_train.export.hf_dir import load_reference
    from autoglm_train.model.decoder_dir import load_decoder_dir

    for load in (
        lambda: load_decoder_dir(pickled_decoder_dir),
        lambda: load_reference(pickled_decoder_dir),
        lambda: Engine(read_bundle(pickled_decoder_dir), device="cpu"),
    ):
        with pytest.raises(OSError, match="safetensors"):
            load()
    assert no_unpickle == []
