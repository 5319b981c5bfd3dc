"""The offline default prompt sets: sizes, held-out sets kept out of training, determinism, readable rows."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest

from autoglm_train.data import prompt_sources
from autoglm_train.data.assistant_prompts import (
    FILES,
    chat_train_prompts,
    heldout_verifiable,
    main,
    train_verifiable,
    write_prompt_sets,
)
from autoglm_train.data.chat_reader import read_chat
from autoglm_train.data.prompt_sources import ASSETS, heldout_chat, normalise
from autoglm_train.data.verifiable import FAMILIES, answer_sentence, is_correct
from autoglm_train.data.verifiable.families import problem_key
from tests.conftest import REPO


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prompts")
    return out, write_prompt_sets(out, seed=0)  # the default sizes


def test_default_sizes(sets: tuple[Path, dict]) -> None:
    out, counts = sets
    chat, verifiable = _rows(out / "train_chat.jsonl"), _rows(out / "train_verifiable.jsonl")
    assert len(chat) == counts["train_chat"] >= 1500
    assert len(chat) + len(verifiable) >= 2000
    assert len(_rows(out / "heldout_chat.jsonl")) == counts["heldout_chat"] >= 150
    held = _rows(out / "heldout_verifiable.jsonl")
    assert len(held) >= 300 and {row["family"] for row in held} == set(FAMILIES)
    assert [row["family"] for row in held[: len(FAMILIES)]] == list(FAMILIES)  # round-robin
    systems = [row for row in chat if row["messages"][0]["role"] == "system"]
    assert len(systems) == counts["train_chat_with_system"] >= 0.10 * len(chat)
    assert all(row["source"] == "teacher" and row["messages"][-1]["role"] == "user" for row in chat)
    assert len({normalise(row["messages"][-1]["content"]) for row in chat}) == len(chat)  # no duplicates
    sources = json.loads((out / "sources.json").read_text())
    assert sources["seed"] == 0 and sources["counts"] == counts
    assert all("licence" in entry for entry in sources["sources"].values())


def test_heldout_chat_never_in_training(sets: tuple[Path, dict]) -> None:
    out, _ = sets
    held = {normalise(row["messages"][0]["content"]) for row in _rows(out / "heldout_chat.jsonl")}
    train = {normalise(row["messages"][-1]["content"]) for row in _rows(out / "train_chat.jsonl")}
    assert held and not held & train
    assert "what is the capital of france?" in held and not any("capital of france" in p for p in train)  # nor reworded


def test_training_drops_heldout_prompts_even_when_the_training_file_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    leaked = ["  WHAT is the capital   of France?", "How do I make a cup of TEA?", "Who wrote Hamlet?"]
    with (assets / "chat_train.txt").open("a", encoding="utf-8") as f:
        f.write("\n".join(leaked) + "\n")
    monkeypatch.setattr(prompt_sources, "ASSETS", assets)
    held = {normalise(p) for p in heldout_chat()}
    assert {normalise(p) for p in leaked} <= held
    for count in (200, 2500):  # a sample of the pool, and the pool plus Shakespeare line prompts
        train = {normalise(p) for p in chat_train_prompts(count, seed=1)}
        assert len(train) == count and not train & held


def test_training_verifiable_never_emits_a_heldout_problem() -> None:
    held = heldout_verifiable()
    assert len(held) == 300 and len({problem_key(item) for item in held}) == 300
    keys, questions = {problem_key(i) for i in held}, {normalise(i.question) for i in held}
    # weekday has 420 problems, 50 held out: 3,000 draws would hit them hundreds of times unfiltered
    for item in train_verifiable(3000, ["weekday", "addition"], seed=5):
        assert problem_key(item) not in keys and normalise(item.question) not in questions


def test_a_family_subsets_heldout_set_is_never_trained_on() -> None:
    # 300 held-out questions over 2 families take 150 of each: more than the 50 each of the all-family set
    subset = ["weekday", "digit_sum"]
    held = {problem_key(i) for i in heldout_verifiable(subset)}
    assert len(held) == 300
    assert not held & {problem_key(i) for i in train_verifiable(2000, subset, seed=0)}


def test_heldout_verifiable_does_not_move_with_the_family_list() -> None:
    alone = heldout_verifiable(["addition"], count=20)
    mixed = [item for item in heldout_verifiable(FAMILIES, count=20 * len(FAMILIES)) if item.family == "addition"]
    assert alone == mixed


def test_byte_identical_for_a_seed(sets: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = sets
    write_prompt_sets(tmp_path / "again", seed=0)
    write_prompt_sets(tmp_path / "other", seed=1)
    for name in (*FILES, "sources.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    for name in ("heldout_chat.jsonl", "heldout_verifiable.jsonl"):
        assert (tmp_path / "other" / name).read_bytes() == (out / name).read_bytes(), name
    for name in ("train_chat.jsonl", "train_verifiable.jsonl"):
        assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes(), name
    assert not list(tmp_path.glob("*/.*.tmp"))  # atomic writes leave no temporary file


def test_rows_read_as_conversations(sets: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = sets
    solved = read_chat(str(out / "train_verifiable.jsonl"), strict=True)
    rows = _rows(out / "train_verifiable.jsonl")
    assert solved.report.skipped == {} and len(solved.documents) == len(rows)
    for doc, row in zip(solved.documents, rows, strict=True):
        assistant = doc["messages"][-1]
        assert assistant["reasoning"] == row["messages"][-1]["reasoning_content"]
        assert assistant["content"] == answer_sentence(row["answer"])
        assert is_correct(assistant["content"], row["answer"]) and row["source"] == "solver"
    # Prompt-only rows: today's reader wants an assistant turn (the teacher writes it later); with one added,
    # nothing else about them may be wrong.
    for name in ("train_chat.jsonl", "heldout_chat.jsonl"):
        rows = _rows(out / name)
        answered = tmp_path / name
        answered.write_text(
            "".join(
                json.dumps({"messages": [*r["messages"], {"role": "assistant", "content": "Yes."}]}) + "\n"
                for r in rows
            ),
            encoding="utf-8",
        )
        read = read_chat(str(answered), strict=True)
        assert read.report.skipped == {} and len(read.documents) == len(rows)


def test_heldout_verifiable_rows_carry_answer_and_steps(sets: tuple[Path, dict]) -> None:
    out, _ = sets
    for row in _rows(out / "heldout_verifiable.jsonl"):
        assert [m["role"] for m in row["messages"]] == ["user"]
        assert row["answer"] and row["reasoning_content"] and row["family"] in FAMILIES


def test_cli_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counts = main(["--out", str(tmp_path), "--chat-train", "50", "--verifiable-train", "12", "--families", "weekday"])
    assert counts["train_chat"] == 50 and counts["train_verifiable"] == {"weekday": 12}
    assert counts["heldout_verifiable"] == {"weekday": 300}
    assert json.loads(capsys.readouterr().out) == counts
    with pytest.raises(ValueError, match="unknown verifiable family 'division'; available: addition"):
        write_prompt_sets(tmp_path, chat_train=1, verifiable_train=1, families=["division"], seed=0)


def test_assets_are_package_data() -> None:
    """A fresh `pip install` must ship every asset: each file matches a package-data pattern."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = REPO / "autoglm_train"
    for path in ASSETS.iterdir():
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in patterns["autoglm_train"]), rel
