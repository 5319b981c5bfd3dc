"""Teacher answers: exact log-probs, a cache that resumes after a kill and is reused, reasoning split like the server.

The teachers are tiny real ``LlamaForCausalLM``s on the embedded SmolLM2 tokenizer (random, or fitted in seconds to
write a think block); the prompts are rendered with the bundle's chat template, as the recipe renders them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm_train.data.chat import prompt_ids
from autoglm_train.distill.answer_cache import ARRAYS_FILE
from autoglm_train.distill.teacher import TeacherSpec
from autoglm_train.distill.teacher_answers import AnswerSpec, teacher_answers, teacher_fingerprint
from autoglm_train.model.chat_template import bundle_chat_template
from autoglm_train.model.prompt_format import end_of_turn_id
from tests.conftest import REPO

QUESTIONS = ["What is the capital of France?", "Hi", "How do I make a cup of tea?", "Who wrote Hamlet?", "2+2?"]
GREEDY = AnswerSpec(max_new_tokens=12, temperature=0.0, top_k_logprobs=5, batch_size=2, shard_rows=2)


@pytest.fixture(scope="module")
def tok(teacher_spec):
    from autoglm_train.distill.teacher import load_teacher_tokenizer

    return load_teacher_tokenizer(teacher_spec)


def _llama(tok, seed: int = 0, hidden: int = 32, init: float = 0.2):
    """A tiny random Llama over the real vocabulary; a wide init gives peaked, tie-free next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=init,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher_dir(tok, tmp_path_factory) -> Path:
    """The tiny teacher saved as an HF directory: the subprocess build and the fingerprint read it."""
    directory = tmp_path_factory.mktemp("teacher")
    _llama(tok).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _prompts(tok, questions=QUESTIONS, thinking: bool = False) -> list[list[int]]:
    template = bundle_chat_template(tok)
    return [prompt_ids(tok, template, [{"role": "user", "content": q}], thinking) for q in questions]


def _load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval().requires_grad_(False)


def test_greedy_answers_carry_the_teachers_exact_logprobs(tok, teacher_dir, tmp_path):
    teacher, prompts = _load(teacher_dir), _prompts(tok)
    answers, stats = teacher_answers(teacher, tok, prompts, GREEDY, tmp_path, "tiny", len(tok))
    assert stats["generated"] == len(prompts) and stats["reused"] == 0
    assert stats["new_tokens"] == sum(len(a.answer_ids) for a in answers)
    for prompt, answer in zip(prompts, answers, strict=True):
        n = len(answer.answer_ids)
        assert answer.prompt_ids == prompt
        assert answer.topk_ids.shape == (n, 5) and answer.topk_logprobs.dtype == np.float32
        assert answer.topk_ids[:, 0].tolist() == answer.answer_ids  # greedy = the teacher's argmax
        assert (np.diff(answer.topk_logprobs, axis=1) <= 0).all()  # most likely first
        assert answer.finished == (answer.answer_ids[-1] in (end_of_turn_id(tok), tok.eos_token_id))
        assert answer.finished or n == GREEDY.max_new_tokens
        with torch.no_grad():  # a fresh, unpadded, uncached forward over prompt + answer
            logits = teacher(torch.tensor([prompt + answer.answer_ids])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n].float(), -1)
        expect = logp.gather(-1, torch.tensor(answer.answer_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(answer.token_logprobs, expect, atol=1e-4)
        np.testing.assert_allclose(answer.topk_logprobs, logp.topk(5, -1).values.numpy(), atol=1e-4)
        assert answer.content == tok.decode(answer.answer_ids, skip_special_tokens=True)


def test_answers_stay_inside_the_kd_vocab(tok, teacher_dir, tmp_path):
    """A teacher with more ids than KD compares never writes one the student lacks."""
    kd_vocab = 3000
    answers, _ = teacher_answers(_load(teacher_dir), tok, _prompts(tok), GREEDY, tmp_path, "tiny", kd_vocab)
    for answer in answers:
        assert max(answer.answer_ids) < kd_vocab and answer.topk_ids.max() < kd_vocab
        assert answer.topk_ids[:, 0].tolist() == answer.answer_ids
        np.testing.assert_allclose(np.exp(answer.topk_logprobs).sum(-1) <= 1 + 1e-5, True)


def test_unchanged_call_reuses_the_cache_and_settings_or_weights_change_it(tok, teacher_dir, tmp_path):
    teacher, prompts = _load(teacher_dir), _prompts(tok)
    teacher_id = teacher_fingerprint(teacher_dir)
    spec = replace(GREEDY, temperature=0.7)
    first, stats = teacher_answers(teacher, tok, prompts, spec, tmp_path, teacher_id, len(tok))
    again, restats = teacher_answers(teacher, tok, prompts, spec, tmp_path, teacher_id, len(tok))
    assert restats["generated"] == 0 and restats["reused"] == len(prompts) and restats["new_tokens"] == 0
    assert restats["cache_dir"] == stats["cache_dir"]
    for a, b in zip(first, again, strict=True):
        assert a.answer_ids == b.answer_ids and a.content == b.content and a.finished == b.finished
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
    # Sampling is seeded per batch: another cache root draws the same answers; greedy draws others.
    fresh, _ = teacher_answers(teacher, tok, prompts, spec, tmp_path / "other", teacher_id, len(tok))
    assert [a.answer_ids for a in fresh] == [a.answer_ids for a in first]
    greedy, greedy_stats = teacher_answers(teacher, tok, prompts, GREEDY, tmp_path, teacher_id, len(tok))
    assert greedy_stats["cache_dir"] != stats["cache_dir"] and greedy_stats["generated"] == len(prompts)
    assert [a.answer_ids for a in greedy] != [a.answer_ids for a in first]
    # Batching and sharding do not change what is generated: same cache.
    _, batched = teacher_answers(teacher, tok, prompts, replace(spec, batch_size=5), tmp_path, teacher_id, len(tok))
    assert batched["cache_dir"] == stats["cache_dir"] and batched["generated"] == 0
    # New weights (same shapes) → a new fingerprint → a new cache; so does the teacher's dtype.
    _llama(tok, seed=1).save_pretrained(tmp_path / "changed")
    changed_id = teacher_fingerprint(tmp_path / "changed")
    assert changed_id != teacher_id
    _, moved = teacher_answers(teacher, tok, prompts, spec, tmp_path, changed_id, len(tok))
    assert moved["cache_dir"] != stats["cache_dir"]
    as_spec = TeacherSpec(path=str(teacher_dir))
    assert teacher_fingerprint(as_spec) != teacher_fingerprint(replace(as_spec, dtype="bfloat16"))


_BUILD = """
import json, sys, time
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from autoglm_train.distill.teacher_answers import AnswerSpec, teacher_answers
teacher_dir, root, prompts_file = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(teacher_dir)
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
generate = teacher.generate
def slow_generate(*args, **kwargs):  # the same teacher, slow enough to be killed between shards
    time.sleep(1.5)
    return generate(*args, **kwargs)
teacher.generate = slow_generate
spec = AnswerSpec(max_new_tokens=12, temperature=0.0, top_k_logprobs=5, batch_size=2, shard_rows=2)
teacher_answers(teacher, tok, json.loads(Path(prompts_file).read_text()), spec, Path(root), "tiny", len(tok))
print("finished")
"""


def test_a_killed_build_resumes_with_only_the_missing_prompts(tok, teacher_dir, tmp_path):
    questions = [*QUESTIONS, "Name a colour.", "Count to three.", "What is rain?"]
    prompts = _prompts(tok, questions)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-c", _BUILD, str(teacher_dir), str(tmp_path / "cache"), str(tmp_path / "prompts.json")]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cache").glob("answers-*/shard-*/" + ARRAYS_FILE)):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    written = len(list((tmp_path / "cache").glob("answers-*/shard-*")))
    assert 1 <= written < 4  # killed mid-build: 4 shards of 2 prompts make the whole cache
    teacher = _load(teacher_dir)
    resumed, stats = teacher_answers(teacher, tok, prompts, GREEDY, tmp_path / "cache", "tiny", len(tok))
    assert stats["reused"] == 2 * written and stats["generated"] == len(prompts) - 2 * written
    whole, _ = teacher_answers(teacher, tok, prompts, GREEDY, tmp_path / "whole", "tiny", len(tok))
    for a, b in zip(resumed, whole, strict=True):
        assert a.answer_ids == b.answer_ids
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


def test_a_damaged_shard_is_named(tok, teacher_dir, tmp_path):
    prompts = _prompts(tok)[:2]
    _, stats = teacher_answers(_load(teacher_dir), tok, prompts, GREEDY, tmp_path, "tiny", len(tok))
    arrays = next(Path(stats["cache_dir"]).glob("shard-*/" + ARRAYS_FILE))
    arrays.write_bytes(arrays.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(arrays)):
        teacher_answers(_load(teacher_dir), tok, prompts, GREEDY, tmp_path, "tiny", len(tok))


def _fit(tok, prompt: list[int], answer: list[int], steps: int = 120):
    """A tiny Llama trained (for real, on the answer) until greedy decoding writes ``answer`` after ``prompt``."""
    model = _llama(tok, hidden=64, init=0.02).train().requires_grad_(True)
    ids, target = torch.tensor([prompt + answer]), torch.tensor(answer)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1]  # the answer's positions only
        loss = torch.nn.functional.cross_entropy(logits, target)
        if loss.item() < 0.02:
            break
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.02, f"the reasoning teacher did not learn its answer (loss {loss.item():.3f})"
    return model.eval().requires_grad_(False)


def test_a_reasoning_teachers_output_is_split_like_the_server_splits_it(tok, tmp_path):
    (plain,) = _prompts(tok, ["What is 2+2?"])
    answer = [
        *tok("<think>\nadd two and two\n</think>\n\nfour", add_special_tokens=False).input_ids,
        end_of_turn_id(tok),
    ]
    teacher = _fit(tok, plain, answer)
    # The same turn after a prompt that opens the think block itself (GLM-4.5/Qwen3-style templates).
    opens = tok("<think>\n", add_special_tokens=False).input_ids
    assert answer[: len(opens)] == opens
    spec = replace(GREEDY, max_new_tokens=24)
    answers, _ = teacher_answers(teacher, tok, [plain, plain + opens], spec, tmp_path, "thinker", len(tok))
    assert [a.answer_ids for a in answers] == [answer, answer[len(opens) :]] and all(a.finished for a in answers)
    for got in answers:
        assert (got.reasoning, got.content) == ("add two and two", "four")
    # A plain answer has no reasoning.
    untrained, _ = teacher_answers(_llama(tok), tok, [plain], GREEDY, tmp_path, "tiny", len(tok))
    assert untrained[0].reasoning is None


def test_other_ranks_wait_for_rank_zeros_answers_and_never_generate(tok, teacher_dir, tmp_path):
    teacher, prompts = _load(teacher_dir), _prompts(tok)
    with pytest.raises(TimeoutError, match=f"{len(prompts)} of {len(prompts)} answers still missing"):
        teacher_answers(teacher, tok, prompts, GREEDY, tmp_path, "tiny", len(tok), wait_s=0.5)
    first, _ = teacher_answers(teacher, tok, prompts, GREEDY, tmp_path, "tiny", len(tok))  # rank 0 writes them
    waited, stats = teacher_answers(teacher, tok, prompts, GREEDY, tmp_path, "tiny", len(tok), wait_s=0.5)
    assert stats["generated"] == 0 and [a.answer_ids for a in waited] == [a.answer_ids for a in first]
