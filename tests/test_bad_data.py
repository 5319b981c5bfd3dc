"""~5% broken rows of every kind: runs complete and report counts and first examples per kind; strict stops them."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_train.data.multimodal.local import LocalPairs
from autoglm_train.data.multimodal.report import BadItemError, SkipReport
from recipes import add_modality
from recipes.distill import run as distill
from tests.bad_inputs import LONG_CHARS, TEXT_BAD_ROWS, write_messy_audio, write_messy_images, write_messy_text
from tests.mm_fixtures import save_micro_decoder
from tests.serve_support import one_thread
from tests.test_add_modality import _cfg as add_modality_cfg
from tests.test_distill_recipe import _compose, _overrides

IMAGE_REASONS = {  # what each broken kind is reported as
    "corrupt image": "corrupt or unreadable image",
    "zero-length image": "corrupt or unreadable image",
    "truncated image": "corrupt or unreadable image",
    "missing image": "missing media file",
    "empty text": "empty or missing text",
    "bad json": "bad json",
    "not utf-8": "not utf-8",
}
AUDIO_REASONS = {
    "garbage wav": "unreadable audio",
    "zero-length file": "unreadable audio",
    "wav without samples": "empty audio",
    "wrong field count": "bad csv row",
    "not utf-8": "not utf-8",
}


def _expected(where: dict[str, list[int]], reasons: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, reason in reasons.items():
        counts[reason] = counts.get(reason, 0) + len(where[kind])
    return counts


def test_distill_completes_on_a_messy_corpus_and_reports_each_kind(tmp_path: Path) -> None:
    path = tmp_path / "messy.jsonl"
    where = write_messy_text(path)
    with one_thread():
        summary = distill(_compose(_overrides(tmp_path, path, steps=3)))
    assert summary["global_step"] == 3 and summary["val/loss"] == summary["val/loss"]  # finished, not NaN

    report = summary["data"]["skipped_rows"]  # also in run_summary.json
    assert report["skipped"] == {kind: len(where[kind]) for kind in TEXT_BAD_ROWS}
    assert all(len(where[kind]) == 10 for kind in TEXT_BAD_ROWS)  # 5% of 200 rows each
    for kind in TEXT_BAD_ROWS:
        shown = [e for e in report["examples"] if f": {kind}: " in e]
        assert [e.split(": ")[0] for e in shown] == [f"{path}:{line}" for line in where[kind][:3]]
    assert report["documents"] == 200 - 5 * 10  # the over-long rows are kept whole and packed into blocks
    tokens = summary["data"]["train_tokens"] + summary["data"]["val_tokens"]
    assert tokens > len(where["over_long"]) * LONG_CHARS // 6


def test_messy_image_pairs_are_skipped_and_counted_per_kind(tmp_path: Path) -> None:
    where = write_messy_images(tmp_path)
    report = SkipReport()
    pairs = LocalPairs(str(tmp_path / "pairs.jsonl")).load(report)
    assert len(pairs) == 100 - 35 and report.seen == 100
    assert dict(report.skipped) == _expected(where, IMAGE_REASONS)
    for kind in ("missing image", "empty text", "bad json", "not utf-8"):
        shown = report.examples[IMAGE_REASONS[kind]]
        assert [e.split(":")[1].split()[0] for e in shown] == [str(n) for n in where[kind][:3]], kind
    with pytest.raises(BadItemError, match=rf"pairs\.jsonl:{where['corrupt image'][0]}: .*corrupt or unreadable"):
        LocalPairs(str(tmp_path / "pairs.jsonl")).load(SkipReport(strict=True))


def test_messy_audio_pairs_skip_the_broken_and_resample_other_rates(tmp_path: Path) -> None:
    where = write_messy_audio(tmp_path)
    report = SkipReport()
    source = LocalPairs(str(tmp_path / "asr.csv"), modality="audio", media_column="path", text_column="transcript")
    pairs = source.load(report)
    assert dict(report.skipped) == _expected(where, AUDIO_REASONS)
    assert dict(report.notes) == {"resampled 8000 -> 16000 Hz": 3, "resampled 44100 -> 16000 Hz": 3}
    assert len(pairs) == 60 - 15 and all(p.media.size == 4000 for p in pairs)  # 0.25 s at 16 kHz, every rate
    with pytest.raises(BadItemError, match=r"asr\.csv.*unreadable audio"):
        source.load(SkipReport(strict=True))


def test_add_modality_completes_on_messy_image_pairs(tmp_path: Path, student_tok) -> None:
    where = write_messy_images(tmp_path / "pairs")
    decoder = save_micro_decoder(tmp_path / "decoder", student_tok)
    local = ["data_mm=local", f"data_mm.source.path={tmp_path / 'pairs' / 'pairs.jsonl'}", "data_mm.test_fraction=0.2"]
    summary = add_modality.run(add_modality_cfg(tmp_path, decoder, "trainer.max_steps=2", data=local))
    assert summary["global_step"] == 2
    report = summary["data_report"]
    assert report["skipped"] == _expected(where, IMAGE_REASONS) and report["kept"] == 65
    assert all(1 <= len(report["examples"][reason]) <= 3 for reason in report["skipped"])
