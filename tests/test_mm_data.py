"""Plugin training data: embedded digits and speech, users' own tables, bad items skipped and counted."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm_train.data.multimodal.datamodule import IGNORE_INDEX, PairDataModule, left_pad
from autoglm_train.data.multimodal.digits import HandwrittenDigits
from autoglm_train.data.multimodal.local import LocalPairs
from autoglm_train.data.multimodal.pairs import DIGIT_WORDS, Pair
from autoglm_train.data.multimodal.report import BadItemError, SkipReport
from autoglm_train.data.multimodal.spec import PairDataSpec
from autoglm_train.model.plugins import SpeechPlugin, VisionPlugin


def tiny_vision() -> VisionPlugin:
    return VisionPlugin("vision", 32, "<|image|>", 4, image_size=16, patch_size=4, encoder_hidden_size=32,
                        encoder_layers=1, encoder_heads=2, encoder_intermediate_size=64)  # fmt: skip


def tiny_speech(max_seconds: float = 1.0) -> SpeechPlugin:
    return SpeechPlugin("speech", 32, "<|audio|>", 4, num_mel_bins=32, encoder_hidden_size=32, encoder_layers=2,
                        encoder_heads=2, encoder_intermediate_size=64, subsampling_conv_channels=16,
                        max_seconds=max_seconds)  # fmt: skip


class ListSource:
    """A source over given pairs (to put bad items where we want them)."""

    def __init__(self, pairs: list[Pair], modality: str = "image") -> None:
        self.pairs, self.modality = pairs, modality

    def load(self, report: SkipReport) -> list[Pair]:
        report.seen += len(self.pairs)
        return list(self.pairs)


def _png(path, value: int = 128, size: int = 12) -> None:
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _wav(path, seconds: float, rate: int, width: int = 2) -> None:
    samples = (0.3 * np.sin(np.linspace(0, 400 * seconds, int(seconds * rate)))).astype(np.float32)
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    scale = float(1 << (8 * width - 1))
    pcm = samples * (scale - 1) + (128 if width == 1 else 0)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(pcm.astype(dtype).tobytes())


def test_sklearn_digits_become_questions_with_digit_labels():
    report = SkipReport()
    pairs = HandwrittenDigits("sklearn", max_items=50, seed=3).load(report)
    assert len(pairs) == report.seen == 50
    assert {p.label for p in pairs} <= set(DIGIT_WORDS)
    assert all(p.label in p.answer for p in pairs)
    assert {p.question for p in pairs} <= {
        "What digit is this?",
        "Which number is written here?",
        "Read the handwritten digit:",
    }
    assert pairs[0].media.dtype == np.uint8 and pairs[0].media.shape == (8, 8)


def test_mnist_5k_is_real_and_balanced():
    pairs = HandwrittenDigits("mnist").load(SkipReport())
    assert len(pairs) == 5000 and pairs[0].media.shape == (28, 28)
    counts = {w: sum(p.label == w for p in pairs) for w in DIGIT_WORDS}
    assert set(counts.values()) == {500}


def test_espeak_synthesizes_varied_16k_utterances():
    from autoglm_train.data.multimodal.espeak import SpokenDigits

    report = SkipReport()
    pairs = SpokenDigits(num_utterances=6, max_words=2, seed=1).load(report)
    assert len(pairs) == 6 and report.notes["resampled 22050 -> 16000 Hz"] == 6
    for pair in pairs:
        assert pair.media.dtype == np.float32 and 0.15 < pair.media.size / 16000 < 2.0
        assert 1 <= len(pair.answer.split()) <= 2 and set(pair.answer.split()) <= set(DIGIT_WORDS)
    assert len({p.where.split()[1] for p in pairs}) > 1  # several voices


def test_local_images_skip_and_count_bad_rows(tmp_path):
    _png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:60])
    rows = [
        {"image": "good.png", "text": "a gray square"},
        {"image": "garbage.png", "text": "x"},
        {"image": "truncated.png", "text": "x"},
        {"image": "missing.png", "text": "x"},
        {"image": "good.png", "text": "   "},
        {"image": None, "text": "x"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = SkipReport()
    pairs = LocalPairs(str(tmp_path / "pairs.jsonl")).load(report)
    assert [p.answer for p in pairs] == ["a gray square"]
    assert pairs[0].question == "Describe the image."
    assert report.to_dict()["skipped"] == {
        "corrupt or unreadable image": 2,
        "missing media file": 1,
        "empty or missing text": 1,
        "missing media": 1,
    }
    with pytest.raises(BadItemError, match=r"pairs\.jsonl:2: .*garbage\.png.*: corrupt or unreadable image"):
        LocalPairs(str(tmp_path / "pairs.jsonl")).load(SkipReport(strict=True))


def test_local_audio_resamples_other_rates_and_skips_unreadable(tmp_path):
    _wav(tmp_path / "a16k.wav", 0.5, 16000)
    _wav(tmp_path / "a8k.wav", 0.5, 8000)
    _wav(tmp_path / "a8bit.wav", 0.25, 16000, width=1)
    _wav(tmp_path / "empty.wav", 0.0, 16000)
    (tmp_path / "noise.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    names = ["a16k", "a8k", "a8bit", "empty", "noise"]
    (tmp_path / "asr.csv").write_text("path,transcript\n" + "".join(f"{n}.wav,say {n}\n" for n in names))
    report = SkipReport()
    source = LocalPairs(str(tmp_path / "asr.csv"), modality="audio", media_column="path", text_column="transcript")
    pairs = source.load(report)
    assert [p.answer for p in pairs] == ["say a16k", "say a8k", "say a8bit"]
    assert pairs[1].media.size == 8000  # 0.5 s at 16 kHz after resampling
    assert abs(float(np.abs(pairs[2].media).max()) - 0.3) < 0.02  # unsigned 8-bit read back centred
    assert report.skipped["empty audio"] == 1 and sum(report.skipped.values()) == 2
    assert report.notes["resampled 8000 -> 16000 Hz"] == 1
    assert pairs[0].question == "Transcribe the audio."


@pytest.fixture(scope="module")
def vision_data(student_tok):
    good = HandwrittenDigits("sklearn", max_items=40).load(SkipReport())
    bad = [Pair(np.full((8, 8), 7.0, np.float32), "What digit is this?", "seven", "seven", "float 0..16 image")]
    spec = PairDataSpec(ListSource(good + bad), val_fraction=0.1, test_fraction=0.2, batch_size=4, preprocess_chunk=16)
    data = PairDataModule(spec, tiny_vision(), student_tok)
    data.setup()
    return data


def test_datamodule_skips_what_the_plugin_rejects_and_splits(vision_data):
    report = vision_data.report_dict()
    assert report["skipped"] == {"rejected by plugin vision": 1}
    assert "float pixels must be in [0, 1]" in report["examples"]["rejected by plugin vision"][0]
    assert report["splits"] == {"train": 28, "val": 4, "test": 8}


def test_batches_target_only_answer_tokens(vision_data, student_tok):
    batch = next(iter(vision_data.train_dataloader()))
    assert batch["media"].shape == (4, 3, 16, 16)
    image_id = student_tok.convert_tokens_to_ids("<|image|>")
    for row in range(4):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        length = int(batch["attention_mask"][row].sum())
        assert int((ids == image_id).sum()) == 4
        targets = labels[labels != IGNORE_INDEX]
        # position t predicts token t+1: the targets are exactly the answer tokens + EOS, in order
        start = int((labels != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(targets, ids[start + 1 : length])
        assert int(targets[-1]) == student_tok.eos_token_id
        assert student_tok.decode(targets[:-1]).strip() == batch["answers"][row]
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        assert torch.equal(prompt, ids[: start + 1])
    assert bool(batch["prompt_mask"][:, -1].all())  # left-padded: every prompt ends at the last column


def test_train_loader_resumes_mid_epoch_at_the_next_batch(vision_data):
    """A checkpoint's loader state restores the data position: the resumed loader yields the batch that was next."""
    first = vision_data.train_dataloader()
    stream = iter(first)
    next(stream), next(stream)
    state = first.state_dict()
    expected = next(stream)
    resumed = vision_data.train_dataloader()
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert state["batches_done"] == 2 and got["answers"] == expected["answers"]
    assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["media"], expected["media"])


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_unpadded_speech_items_give_the_same_tokens():
    """Items are stored without trailing padding and zero-padded per batch: tokens must not change."""
    plugin = tiny_speech(max_seconds=1.0).eval()
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (4000, 9000)]
    full = plugin.preprocess(clips)
    items = [plugin.unpad(x) for x in full]
    assert [len(x) for x in items] == [25, 56] and len(full[0]) == 101
    batch = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
    with torch.no_grad():
        torch.testing.assert_close(plugin.encode(batch), plugin.encode(full), atol=1e-5, rtol=1e-5)
    image = torch.ones(3, 16, 16)
    assert tiny_vision().unpad(image) is image  # fixed-size inputs are kept whole
