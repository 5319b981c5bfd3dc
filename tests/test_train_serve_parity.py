"""Train → export → serve: a plugin answers through the OpenAI API exactly as its training-time evaluation did.

Micro plugins (vision on real digits with the media right before the answer, the toy sensor modality from
``tests/toy`` with the media where the client put it) are trained a few steps
by ``recipe=add_modality``, exported by the export tool, served by a real uvicorn on 127.0.0.1 and asked
through the plain ``openai`` client. The served greedy answers must equal the held-out answers the run
wrote (``heldout_outputs.jsonl``) for both content orders. A plugin pinned to another decoder is refused
at export and at server start.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.export.cli import export_main
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.local import running_server
from recipes import add_modality
from tests.conftest import REPO
from tests.mm_fixtures import DIGITS, TINY_VISION, save_micro_decoder
from tests.serve_support import one_thread

KEY = "sk-parity"
RUN = [
    "data_mm.batch_size=8",
    "data_mm.eval_batch_size=16",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=6",
    "trainer.val_check_interval=6",
    "trainer.limit_val_batches=1",
    "recipe.checkpoint_every_n_steps=100",
    "recipe.parity_max_new_tokens=4",
    "recipe.eval_max_new_tokens=3",
    "optim.optimizer.lr=3e-3",
    "optim.scheduler.num_warmup_steps=1",
]


def _compose(root: Path, decoder: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=["recipe=add_modality", f"paths.root_dir={root}", f"decoder={decoder}", *RUN, *overrides],
        )


def _run(cfg) -> dict:
    """``add_modality.run`` plus the config file train.py's Hydra run leaves (the held-out split is rebuilt from it)."""
    out = Path(cfg.paths.output_dir)
    (out / "hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "hydra" / "config.yaml")
    with one_thread():
        return add_modality.run(cfg)


def _train_vision(root: Path, decoder: Path) -> dict:
    return _run(_compose(root, decoder, *TINY_VISION, *DIGITS))


def _train_sensor(root: Path, decoder: Path) -> dict:
    """The toy third modality: its plugin yaml and pair source live in tests/toy, nothing in the package."""
    cfg = _compose(root, decoder, "data_mm=digits")
    with open_dict(cfg):
        cfg.plugin = OmegaConf.merge(OmegaConf.load(REPO / "tests" / "toy" / "sensor.yaml"), {"hidden_size": 32})
        cfg.data_mm.source = {"_target_": "tests.toy.sensor_pairs.SensorPairs", "items": 60, "seed": 0}
        cfg.data_mm.media_at = "turn"  # media where the client puts it: the two content orders render differently
        cfg.paths.output_dir = str(root / "outputs" / "sensor")
    return _run(cfg)


@pytest.fixture(scope="module")
def trained(student_tok, tmp_path_factory):
    """A micro decoder, vision + sensor plugins trained against it, and the exported bundle."""
    root = tmp_path_factory.mktemp("parity")
    decoder = save_micro_decoder(root / "student", student_tok)
    vision = _train_vision(root, decoder)
    sensor = _train_sensor(root, decoder)
    bundle = root / "bundle"
    argv = ["--decoder", str(decoder), "--out", str(bundle), "--plugin", vision["artifact"]]
    # float32: the served decoder holds the very weights the evaluation ran (the default bf16 form rounds them)
    argv += [
        "--plugin",
        sensor["artifact"],
        "--dtype",
        "float32",
        "--no-int8",
        "--gguf",
        "none",
        "--no-onnx",
        "--no-verify",
        "--quiet",
    ]
    assert export_main(argv) == 0
    return {"root": root, "decoder": decoder, "vision": vision, "sensor": sensor, "bundle": bundle}


@pytest.fixture(scope="module")
def client(trained):
    app = create_app(
        ServerConfig(bundle=str(trained["bundle"]), api_keys=[KEY], rate_limit=None),
        Engine(read_bundle(trained["bundle"])),
    )
    with one_thread(), running_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _heldout(summary: dict) -> list[dict]:
    path = Path(summary["artifact"]).parents[1] / "heldout_outputs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _heldout_pairs(summary: dict) -> list:
    from autoglm_train.pipeline.heldout import held_out_pairs

    pairs, _ = held_out_pairs(Path(summary["artifact"]).parents[1])
    return pairs


def _png(pixels) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask(client, question: str, media_part: dict, order: str, max_tokens: int) -> tuple[str, list[str], list[float]]:
    """The served answer's text, its tokens (as logprobs name them) and their logprobs, greedy."""
    text = {"type": "text", "text": question}
    content = [text, media_part] if order == "text_first" else [media_part, text]
    response = client.chat.completions.create(
        model="bundle",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        logprobs=True,
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    return (choice.message.content or "").strip(), [t.token for t in content], [t.logprob for t in content]


def _assert_same_answers(served: list, rows: list[dict], order: str, tokenizer) -> None:
    """Text and tokens equal; logprobs equal to 1e-4 (they depend on every prompt token, media included)."""
    for (text, tokens, logprobs), row in zip(served, rows, strict=True):
        assert text == row[f"output_{order}"]
        assert tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in row[f"output_ids_{order}"]]
        assert tokens  # never a comparison of two empty answers
        assert logprobs == pytest.approx(row[f"output_logprobs_{order}"], abs=1e-4)


@pytest.mark.parametrize("order", ["text_first", "media_first"])
def test_served_vision_answers_equal_the_training_time_evaluation(trained, client, order, student_tok):
    summary = trained["vision"]
    rows = _heldout(summary)
    pairs = _heldout_pairs(summary)
    assert [p.answer for p in pairs] == [r["answer"] for r in rows]
    budget = summary["eval_max_new_tokens"]
    served = [
        _ask(client, p.question, {"type": "image_url", "image_url": {"url": _png(p.media)}}, order, budget)
        for p in pairs
    ]
    _assert_same_answers(served, rows, order, student_tok)


@pytest.mark.parametrize("order", ["text_first", "media_first"])
def test_toy_modality_is_served_through_its_own_content_part(trained, client, order, student_tok):
    """The sensor plugin (declared modality "sensor") is reached with {"type": "input_sensor", ...}; trained with
    ``media_at=turn``, its prompts keep the client's content order, and each order answers as in training."""
    summary = trained["sensor"]
    rows = _heldout(summary)
    pairs = _heldout_pairs(summary)
    served = [
        _ask(client, p.question, {"type": "input_sensor", "input_sensor": {"data": p.media}}, order, 3) for p in pairs
    ]
    _assert_same_answers(served, rows, order, student_tok)


@pytest.fixture(scope="module")
def other_decoder(trained, student_tok) -> Path:
    """A real decoder of another shape (wider FFN): the vision plugin was not trained against it."""
    return save_micro_decoder(trained["root"] / "other-student", student_tok, seed=1, intermediate_size=96)


def _fingerprints(trained, other: Path) -> tuple[str, str]:
    from autoglm_train.model.decoder_dir import placeholder_ids
    from autoglm_train.model.pin import pin_decoder
    from autoglm_train.model.plugin_io import read_plugin_meta

    trained_for = read_plugin_meta(trained["vision"]["artifact"])["decoder_fingerprint"]
    from transformers import AutoTokenizer

    tokenizer_ids = placeholder_ids(AutoTokenizer.from_pretrained(other))
    return trained_for, pin_decoder(other, tokenizer_ids, hash_weights=False).fingerprint


def test_export_refuses_a_plugin_pinned_to_another_decoder(trained, other_decoder, tmp_path, capsys):
    out = tmp_path / "refused"
    argv = ["--decoder", str(other_decoder), "--out", str(out), "--plugin", trained["vision"]["artifact"]]
    assert export_main([*argv, "--no-int8", "--gguf", "none", "--no-onnx", "--no-verify", "--quiet"]) == 1
    error = capsys.readouterr().err
    trained_for, other = _fingerprints(trained, other_decoder)
    assert trained_for != other
    assert "export refused" in error and trained_for[:12] in error and other[:12] in error
    assert "config.json" in error and not out.exists()


def test_server_refuses_to_start_with_a_plugin_pinned_to_another_decoder(trained, other_decoder, tmp_path):
    """A hand-assembled bundle (another decoder + the vision plugin copied in): the server exits with one line."""
    bundle = tmp_path / "mismatched"
    argv = ["--decoder", str(other_decoder), "--out", str(bundle), "--no-int8", "--gguf", "none", "--no-onnx"]
    assert export_main([*argv, "--no-verify", "--quiet"]) == 0
    shutil.copytree(trained["vision"]["artifact"], bundle / "plugins" / "vision")
    cmd = [sys.executable, "-m", "autoglm_train.serve", "--bundle", str(bundle), "--port", "0", "--no-auth"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    trained_for, other = _fingerprints(trained, other_decoder)
    assert last.startswith("error: plugin vision") and trained_for in last and other in last
