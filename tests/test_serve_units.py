"""Server building blocks without a model: thinking split, stop strings, sampling, media decoding, config, bundles."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.detokenize import IncrementalDecoder, TextAssembler
from autoglm_train.engine.routing import PluginSlot
from autoglm_train.engine.sampling import Sampler, SamplingParams, _top_p
from autoglm_train.export.manifest import BundleError
from autoglm_train.model.thinking import ThinkSplitter, split_reasoning
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.errors import APIError
from autoglm_train.serve.multimodal import decode_audio, decode_image, parse_messages
from autoglm_train.serve.schemas import ChatMessage
from autoglm_train.serve.security import KeyChecker
from tests.serve_support import png_data_url, wav_base64

OUTPUT = "<think>\n Two and two.\n </think>\n\nFour.</thi"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_think_split_streamed_equals_whole(size):
    whole = split_reasoning(OUTPUT)
    splitter = ThinkSplitter()
    parts = [splitter.feed(OUTPUT[i : i + size]) for i in range(0, len(OUTPUT), size)] + [splitter.flush()]
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == whole == ("Two and two.", "Four.</thi")


@pytest.mark.parametrize(
    ("text", "in_reasoning", "expected"),
    [
        ("Plain answer.", False, ("", "Plain answer.")),
        ("  <think>why</think>ok", False, ("why", "ok")),
        ("why</think>\n\nok", True, ("why", "ok")),
        ("<think>never closed", False, ("never closed", "")),
        ("answer then <think>x</think>", False, ("", "answer then <think>x</think>")),
        ("<thi", False, ("", "<thi")),
    ],
)
def test_think_split_cases(text, in_reasoning, expected):
    assert split_reasoning(text, in_reasoning) == expected


def test_stop_strings_cut_exactly_and_are_never_half_emitted(student_tok):
    ids = student_tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    text = TextAssembler(IncrementalDecoder(student_tok), stop=["fox j", "zzz"])
    out, stopped = "", False
    for token in ids:
        piece, stopped = text.push(token)
        out += piece
        assert "fox" not in out  # held back while it might be the stop string
        if stopped:
            break
    assert stopped and out == "The quick brown "


def test_incremental_decoding_keeps_multibyte_characters_whole(student_tok):
    sentence = "naïve café — 東京 🙂 done"
    decoder = IncrementalDecoder(student_tok)
    pieces = [decoder.push(t) for t in student_tok(sentence)["input_ids"]] + [decoder.flush()]
    assert "".join(pieces) == sentence
    assert all("\ufffd" not in p for p in pieces)


def test_sampling_is_seeded_greedy_at_zero_and_top_p_keeps_the_head():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    draws = [[Sampler(SamplingParams(8, temperature=1.0, seed=7), 50)(logits)[0] for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]
    assert Sampler(SamplingParams(8, temperature=0.0), 50)(logits)[0] == int(logits.argmax())
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.equal(_top_p(probs.clone(), 0.7) > 0, torch.tensor([True, True, False, False]))
    assert torch.equal(_top_p(probs.clone(), 0.1) > 0, torch.tensor([True, False, False, False]))


def test_sampler_never_picks_padded_vocab_rows_and_reports_logprobs():
    logits = torch.zeros(10)
    logits[8] = 50.0  # a padded row the tokenizer does not have
    token, record = Sampler(SamplingParams(1, temperature=0.0, logprobs=2), vocab_limit=8)(logits)
    assert token < 8 and record.token_id == token and len(record.top) == 2
    assert record.logprob == pytest.approx(torch.log_softmax(logits[:8], -1)[token].item(), abs=1e-5)


def test_penalties_and_logit_bias_change_the_choice():
    logits = torch.tensor([2.0, 1.9, 0.0])
    sampler = Sampler(SamplingParams(4, temperature=0.0, frequency_penalty=1.0), 3)
    assert [sampler(logits)[0] for _ in range(2)] == [0, 1]
    assert Sampler(SamplingParams(1, temperature=0.0, logit_bias={2: 5.0}), 3)(logits)[0] == 2


SLOTS = {"image_url": PluginSlot("vision", "<|image|>", 4)}


def _parse(content):
    return parse_messages([ChatMessage(role="user", content=content)], SLOTS, {"<|image|>", "<|audio|>"}, 10**6)


def test_developer_role_becomes_system():
    parsed = parse_messages([ChatMessage(role="developer", content="Be brief.")], SLOTS, set(), 10**6)
    assert parsed.messages == [{"role": "system", "content": "Be brief."}]


def test_content_parts_become_placeholders_and_items():
    parsed = _parse(
        [
            {"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": png_data_url()}},
            {"type": "text", "text": "?"},
        ]
    )
    assert parsed.messages == [{"role": "user", "content": "Look: " + "<|image|>" * 4 + "?"}]
    assert parsed.items["vision"][0].size == (20, 20)


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
            "unsupported_image_url",
            "http(s)",
        ),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "invalid_image", "base64"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}], "invalid_image", "decode"),
        ([{"type": "input_audio", "input_audio": {"data": "AAAA"}}], "unsupported_modality", "audio"),
        ([{"type": "video_url", "video_url": {"url": "x"}}], "unsupported_content_type", "video_url"),
        ("sneaky <|image|> token", "reserved_token", "<|image|>"),
        (
            [{"type": "image_url", "image_url": {"url": png_data_url()}}] * 2,
            "too_many_items",
            "at most one",
        ),
    ],
)
def test_bad_content_is_a_400_naming_the_problem(content, code, words):
    with pytest.raises(APIError) as err:
        _parse(content)
    assert err.value.status == 400 and err.value.code == code and words in err.value.message
    assert err.value.param.startswith("messages[0].content")


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    with pytest.raises(APIError, match="pixel limit"):
        decode_image(png_data_url(size=50), "x", max_pixels=100)


def test_wav_decoding_to_mono_float():
    wave, rate = decode_audio(wav_base64(0.25, 8000), "wav", "x")
    assert rate == 8000 and wave.dtype.name == "float32" and wave.shape == (2000,) and abs(wave).max() <= 1.0
    with pytest.raises(APIError, match="not supported"):
        decode_audio(wav_base64(), "mp3", "x")
    with pytest.raises(APIError, match="WAV"):
        decode_audio(base64.b64encode(b"RIFF0000WAVEjunk").decode(), "wav", "x")


def test_key_check_accepts_only_configured_keys():
    check = KeyChecker(["alpha", "beta"])
    assert check("alpha") and check("beta")
    assert not check("alph") and not check("alphaa") and not check("") and not check(None)


def test_config_refuses_to_start_without_an_explicit_auth_choice():
    with pytest.raises(ValueError, match="no API key configured"):
        ServerConfig(bundle="x")
    assert ServerConfig(bundle="x", api_keys=["EMPTY"]).no_auth
    with pytest.raises(ValueError, match="cannot be combined"):
        ServerConfig(bundle="x", api_keys=["EMPTY", "real"])
    with pytest.raises(ValueError, match="rate_limit"):
        ServerConfig(bundle="x", no_auth=True, rate_limit="lots")
    with pytest.raises(ValueError, match="quantize"):
        ServerConfig(bundle="x", no_auth=True, quantize="int4")


def test_bundle_reader_accepts_bundles_and_plain_decoder_dirs(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    info = read_bundle(plain)
    assert info.decoder_dir == plain and info.plugin_dirs == {} and info.name == "plain"

    bundle = tmp_path / "b"
    (bundle / "decoder").mkdir(parents=True)
    (bundle / "decoder" / "config.json").write_text("{}")
    (bundle / "plugins" / "vision").mkdir(parents=True)
    (bundle / "plugins" / "vision" / "plugin.json").write_text(
        json.dumps({"name": "vision", "placeholder": "<|image|>"})
    )
    header = {"format": "autoglm-bundle", "format_version": 1}
    (bundle / "manifest.json").write_text(
        json.dumps({**header, "model_name": "m", "forms": {"hf": {"path": "decoder"}}})
    )
    info = read_bundle(bundle)
    assert info.decoder_dir == bundle / "decoder" and set(info.plugin_dirs) == {"vision"} and info.name == "m"

    (bundle / "manifest.json").write_text(
        json.dumps({**header, "modules": {"plugins": {"speech": {"path": "plugins/speech"}}}})
    )
    with pytest.raises(FileNotFoundError, match="speech"):
        read_bundle(bundle)
    # the manifest is read by its one reader (export.manifest): another format or a newer version is refused
    (bundle / "manifest.json").write_text(json.dumps({"model_name": "m"}))
    with pytest.raises(BundleError, match="format is None"):
        read_bundle(bundle)
    (bundle / "manifest.json").write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(BundleError, match="newer than this reader"):
        read_bundle(bundle)
    with pytest.raises(FileNotFoundError, match="no decoder"):
        read_bundle(tmp_path)


def test_engine_errors_get_their_status_in_one_table():
    """The engine raises what happened; only serve/errors.py turns it into an HTTP status (unknown kinds: 500)."""
    from autoglm_train.engine.errors import EngineError, InvalidRequest, PluginUnavailable
    from autoglm_train.serve.errors import api_error

    bad = api_error(InvalidRequest("too short", param="messages", code="invalid_media"))
    assert (bad.status, bad.message, bad.param, bad.code) == (400, "too short", "messages", "invalid_media")
    assert api_error(PluginUnavailable("no weights", code="plugin_unavailable")).status == 503
    assert api_error(EngineError("new kind")).status == 500
