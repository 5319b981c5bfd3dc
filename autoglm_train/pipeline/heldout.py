"""Write the runs' held-out data as files a client can send: text jsonl, digit PNGs, speech WAVs.

    python -m autoglm_train.pipeline.heldout --distill RUN --vision RUN --speech RUN --out DIR \
        [--bundle B --chat N --verifiable N --answer-tokens N]

The text is the distill run's validation split; the images and clips are the plugin runs' own
held-out (test) split, rebuilt from each run's saved config with the same seeded split, so the
server is never evaluated on an item its plugin trained on. Each row carries the run's own question and
generation budget, so the served score is measured on the items and settings of the training-time one.
With ``--chat``/``--verifiable``, the held-out chat prompts with
the distill run's teacher's sampled answers and the held-out verifiable questions are written too
(:mod:`.heldout_assistant`). ``tools/eval_server.py`` reads the jsonl files (``texts.jsonl``,
``images.jsonl``, ``audio.jsonl``, ``chat.jsonl``, ``verifiable.jsonl``); ``manifest.json`` is written last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np


def held_out_pairs(run: Path) -> tuple[list, Any]:
    """The test split of an add_modality run as raw pairs (media before the plugin's preprocessing), and its spec."""
    from hydra.utils import instantiate

    from autoglm_train.data.multimodal.datamodule import split_pairs
    from autoglm_train.data.multimodal.report import SkipReport
    from autoglm_train.eval.heldout_text import run_config

    spec = instantiate(run_config(run).data_mm)
    report = SkipReport()
    pairs = spec.source.load(report)
    summary = json.loads((run / "run_summary.json").read_text())
    trained = summary.get("data_report", {})
    if report.num_skipped or trained.get("skipped"):
        # the run split the pairs its plugin accepted; with items dropped, indices would not line up
        raise ValueError(f"{run}: items were skipped while loading; its held-out split cannot be rebuilt exactly")
    test = split_pairs(pairs, spec)["test"]
    expected = trained.get("splits", {}).get("test")
    if expected is not None and expected != len(test):
        raise ValueError(f"{run}: rebuilt {len(test)} held-out items but the run held out {expected}")
    return test, spec


def write_texts(run: Path, out: Path, count: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from autoglm_train.eval.heldout_text import val_batches

    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    rows = []
    for batch in val_batches(run, tokenizer, count, batch_size=count):
        for ids in batch["input_ids"]:
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text:
                rows.append({"text": text})
    _jsonl(out / "texts.jsonl", rows)
    return rows


def write_images(run: Path, out: Path, count: int) -> list[dict[str, Any]]:
    from PIL import Image

    (out / "images").mkdir()
    rows = []
    pairs, _ = held_out_pairs(run)
    for i, pair in enumerate(pairs[:count]):
        name = f"images/{i:04d}.png"
        Image.fromarray(np.asarray(pair.media)).save(out / name)
        rows.append({"image": name, "label": pair.label, "prompt": pair.question, "max_tokens": _budget(run)})
    _jsonl(out / "images.jsonl", rows)
    return rows


def write_audio(run: Path, out: Path, count: int) -> list[dict[str, Any]]:
    (out / "audio").mkdir()
    pairs, spec = held_out_pairs(run)
    rows = []
    for i, pair in enumerate(pairs[:count]):
        samples, rate = pair.media if isinstance(pair.media, tuple) else (pair.media, spec.source.sampling_rate)
        name = f"audio/{i:04d}.wav"
        _wav(out / name, np.asarray(samples, dtype=np.float32), int(rate))
        rows.append({"audio": name, "text": pair.answer, "prompt": pair.question, "max_tokens": _budget(run)})
    _jsonl(out / "audio.jsonl", rows)
    return rows


def _assistant(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """The held-out chat and verifiable files' manifest entries (with the teacher answers' build stats)."""
    from autoglm_train.pipeline import heldout_assistant as assistant

    entries: dict[str, dict[str, Any]] = {}
    if args.chat:
        stats = assistant.write_chat(args.distill, args.bundle, out, args.chat, args.answer_tokens)
        entries["chat"] = {
            "items": stats.pop("items"),
            "file": assistant.CHAT_FILE,
            "source_run": str(args.distill),
            "teacher_answers": stats,
        }
    if args.verifiable:
        items = assistant.write_verifiable(out, args.verifiable, args.distill)
        entries["verifiable"] = {"items": items, "file": assistant.VERIFIABLE_FILE, "source": "heldout_verifiable"}
    return entries


def _budget(run: Path) -> int:
    """The run's held-out generation budget: the served evaluation asks for the same ``max_tokens``."""
    return int(json.loads((run / "run_summary.json").read_text())["eval_max_new_tokens"])


def _wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """32-bit PCM mono (``input_audio`` takes 8/16/32-bit PCM): the clip the run evaluated, to 2^-31."""
    scaled = np.clip(samples.astype(np.float64), -1.0, 1.0 - 2.0**-31) * 2.0**31
    pcm = np.round(scaled).astype("<i4")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(4)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m autoglm_train.pipeline.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--distill", required=True, type=Path, help="recipe=distill run (held-out text)")
    p.add_argument("--vision", type=Path, help="recipe=add_modality plugin=vision run (held-out digit images)")
    p.add_argument("--speech", type=Path, help="recipe=add_modality plugin=speech run (held-out speech clips)")
    p.add_argument("--out", required=True, type=Path, help="folder to create (written atomically)")
    p.add_argument("--texts", type=int, default=64, help="held-out texts at most")
    p.add_argument("--items", type=int, default=None, help="images and clips at most, each (default: all held out)")
    p.add_argument("--bundle", type=Path, help="the exported bundle whose chat template renders the chat prompts")
    p.add_argument("--chat", type=int, default=0, help="held-out chat prompts answered by the teacher (0: none)")
    p.add_argument("--verifiable", type=int, default=0, help="held-out verifiable questions (0: none)")
    p.add_argument("--answer-tokens", type=int, default=64, help="longest teacher answer to a chat prompt")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        counts = {"texts": len(write_texts(args.distill, tmp, args.texts))}
        if args.vision:
            counts["images"] = len(write_images(args.vision, tmp, args.items))
        if args.speech:
            counts["audio"] = len(write_audio(args.speech, tmp, args.items))
        sources = {"texts": args.distill, "images": args.vision, "audio": args.speech}
        manifest = {k: {"items": n, "file": f"{k}.jsonl", "source_run": str(sources[k])} for k, n in counts.items()}
        manifest.update(_assistant(args, tmp))
        counts.update({k: v["items"] for k, v in manifest.items()})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"held-out data written to {args.out}: {counts}")


if __name__ == "__main__":
    main()
