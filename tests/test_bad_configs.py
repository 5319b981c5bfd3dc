"""A config or input the run cannot use stops ``train.py`` with one ``error:`` line, before any heavy work.

Every case runs its recipe under ``train.py``'s handler: exactly one ``error:`` line naming the field, exit status 2,
no checkpoint written. A few run the real entry point in a subprocess (the rest too with ``-m slow``): that line is
the last one on stderr, with no traceback. Unknown config options such as ``plugin=nope`` fail earlier still, in
Hydra's composition (``tests/test_config.py``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from autoglm_train.errors import EXIT_CODE, exit_on_config_error
from autoglm_train.model.plugin_io import save_plugin
from autoglm_train.model.registry import instantiate_plugin, plugin_config
from tests.bad_inputs import write_messy_text
from tests.conftest import REPO
from tests.mm_fixtures import TINY_RUN, TINY_VISION, save_micro_decoder
from tests.serve_support import one_thread
from tests.test_distill_recipe import _compose, _overrides


def _other_tokenizer(directory: Path) -> Path:
    """A real tokenizer whose ids mean other strings than the teacher's."""
    vocab = {w: i for i, w in enumerate(["<eos>", "to", "be", "or", "not"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)
    return directory


def _wide_vision_plugin(directory: Path) -> Path:
    """A vision plugin projecting to 64 wide, i.e. trained for another decoder than the 32-wide micro one."""
    shape = {k.split("=")[0].removeprefix("plugin."): int(k.split("=")[1]) for k in TINY_VISION}
    save_plugin(instantiate_plugin(plugin_config("vision", hidden_size=64, **shape)), directory)
    return directory


def _distill(tmp_path: Path, *extra: str) -> list[str]:
    return [*_overrides(tmp_path, tmp_path / "corpus.jsonl", 2), *extra]


def _add_modality(tmp_path: Path, decoder: Path | str, *extra: str) -> list[str]:
    return ["recipe=add_modality", f"paths.root_dir={tmp_path}", f"decoder={decoder}", *TINY_VISION, *TINY_RUN, *extra]


CASES = {
    "missing teacher path": (
        lambda t, tok: _distill(t, "teacher=gguf", "teacher.path=/nope/teacher.gguf"),
        "error: teacher.path='/nope/teacher.gguf': no such file or directory",
    ),
    "precision the CPU cannot run": (
        lambda t, tok: _distill(t, "trainer.precision=16-true"),
        "error: trainer.precision=16-true cannot run on CPU (fp16 arithmetic on CPU gives NaN losses)",
    ),
    "fp16 autocast on CPU": (
        lambda t, tok: _distill(t, "trainer.precision=16-mixed"),
        "error: trainer.precision=16-mixed cannot run on CPU (torch CPU autocast silently runs it as bf16)",
    ),
    "teacher sharded without ZeRO-3": (
        lambda t, tok: _distill(t, "teacher.shard=true"),
        "error: teacher.shard=true partitions the teacher with DeepSpeed ZeRO-3: it needs trainer=deepspeed_zero3"
        " (this run: SingleDeviceStrategy)",
    ),
    "teacher sharded and int8": (
        lambda t, tok: _distill(t, "teacher.shard=true", "teacher.load_in_8bit=true"),
        "error: teacher.shard=true with teacher.load_in_8bit=true: DeepSpeed cannot partition bitsandbytes int8"
        " weights; pick one",
    ),
    "not a precision": (
        lambda t, tok: _distill(t, "trainer.precision=fp8"),
        "error: trainer.precision=fp8 is not a Lightning precision",
    ),
    "vocab mismatch": (
        lambda t, tok: _distill(t, f"recipe.student_tokenizer={_other_tokenizer(t / 'tok')}"),
        "error: student tokenizer (5 tokens) does not extend the teacher's (49152 tokens) id for id",
    ),
    "invalid data field": (
        lambda t, tok: _distill(t, "data.seq_len=4"),
        "error: data: ValueError: data.seq_len must be >= 8, got 4",
    ),
    "bad row with data.strict": (
        lambda t, tok: (write_messy_text(t / "corpus.jsonl", rows=40), _distill(t, "data.strict=true"))[1],
        "corpus.jsonl:1: bad_json: Unterminated string starting at (data.strict=true; set it false to skip bad rows)",
    ),
    "missing decoder": (
        lambda t, tok: _add_modality(t, "/nope/student"),
        "error: decoder=/nope/student: no Hugging Face decoder there (no config.json)",
    ),
    "plugin trained for another decoder": (
        lambda t, tok: _add_modality(
            t, save_micro_decoder(t / "decoder", tok), f"recipe.init_plugin={_wide_vision_plugin(t / 'wide')}"
        ),
        "holds plugin 'vision' projecting to 64; this run trains 'vision' for a decoder of width 32",
    ),
}


def _no_checkpoints(root: Path) -> bool:
    return not list(root.rglob("checkpoints/*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_one_clear_line(tmp_path: Path, student_tok, capsys, case: str) -> None:
    """The recipe itself under train.py's handler (in process: seconds per case)."""
    build, message = CASES[case]
    cfg = _compose(build(tmp_path, student_tok))
    with one_thread(), pytest.raises(SystemExit) as exit_, exit_on_config_error():
        importlib.import_module(cfg.recipe.module).run(cfg)
    assert exit_.value.code == EXIT_CODE
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert _no_checkpoints(tmp_path)


def _train(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


# In CI: one error raised inside Hydra's instantiate, one raised in the recipe (it used to print a 10-line traceback).
SUBPROCESS_IN_CI = ("missing teacher path", "precision the CPU cannot run")


@pytest.mark.parametrize(
    "case", [c if c in SUBPROCESS_IN_CI else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_train_py_prints_that_line_last_and_no_traceback(tmp_path: Path, student_tok, case: str) -> None:
    build, message = CASES[case]
    result = _train(build(tmp_path, student_tok))
    assert result.returncode == EXIT_CODE, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert _no_checkpoints(tmp_path)
