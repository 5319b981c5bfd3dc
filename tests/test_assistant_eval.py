"""The assistant judged through a real server (uvicorn on 127.0.0.1, the test bundle): KL to the teacher on its
answers against an in-process computation, the thinking switch seen by the openai client, the plain-English check
and per-family accuracy on hand-made answers."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch

from autoglm_train.engine.bundle import read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.eval.assistant import degeneracy
from autoglm_train.eval.verifiable import Answered, Question, Reply, score
from autoglm_train.serve.app import create_app
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.local import running_server
from tests.serve_support import ANSWER, KEY, MODEL, QUESTION, REASONING, one_thread


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def url(bundles):
    app = create_app(
        ServerConfig(bundle=str(bundles.full), api_keys=[KEY], rate_limit=None), Engine(read_bundle(bundles.full))
    )
    with running_server(app) as base:
        yield f"{base}/v1"


@pytest.fixture(scope="module")
def tokenizer(bundles):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundles.full / "decoder")


def _chat_items(tokenizer) -> list[dict]:
    """Two held-out prompts rendered thinking-off as the server renders them, with 'teacher answers' of different
    lengths; the teacher's log-probs and top-1 ids are made up (any teacher's would do for the estimator)."""
    from autoglm_train.data.chat import prompt_ids

    rows = []
    for messages, answer in ((QUESTION, ANSWER), ([{"role": "user", "content": "Say hello."}], "Hello there, friend")):
        ids = prompt_ids(tokenizer, tokenizer.chat_template, messages, enable_thinking=False)
        answer_ids = [
            *tokenizer(answer, add_special_tokens=False).input_ids,
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
        ]
        logprobs = [-0.25 * (i + 1) for i in range(len(answer_ids))]
        rows.append({"messages": messages, "prompt_ids": ids, "answer_ids": answer_ids, "teacher_logprobs": logprobs})
    return rows


def _in_process(bundles, tokenizer, rows: list[dict]) -> tuple[list[list[float]], list[list[int]]]:
    """The bundle decoder's own log-prob and argmax at each answer position (over the served vocabulary)."""
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(bundles.full / "decoder").eval()
    limit = min(len(tokenizer), decoder.config.vocab_size)
    logprobs, argmax = [], []
    for row in rows:
        ids = torch.tensor([[*row["prompt_ids"], *row["answer_ids"]]])
        with torch.no_grad():
            logp = torch.log_softmax(decoder(ids).logits[0, :-1, :limit].float(), dim=-1)
        at = range(len(row["prompt_ids"]) - 1, ids.shape[1] - 1)
        logprobs.append([logp[t, ids[0, t + 1]].item() for t in at])
        argmax.append([int(logp[t].argmax()) for t in at])
    return logprobs, argmax


def _run_client(url: str, tmp_path, *args: str) -> dict:
    from autoglm_train.eval.client import main

    out = tmp_path / "server.json"
    main(["--base-url", url, "--api-key", KEY, "--json", str(out), "--workers", "3", *args])
    return json.loads(out.read_text())


def test_kl_to_teacher_through_the_server_equals_the_in_process_estimate(url, bundles, tokenizer, tmp_path):
    rows = _chat_items(tokenizer)
    student, argmax = _in_process(bundles, tokenizer, rows)
    # the teacher agrees with the student's top-1 at even positions only: agreement is neither 0 nor 1
    for row, top in zip(rows, argmax, strict=True):
        row["teacher_top1"] = [t if i % 2 == 0 else (t + 1) % 1000 for i, t in enumerate(top)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = _run_client(url, tmp_path, "--chat", str(tmp_path / "chat.jsonl"), "--chat-tokens", "12")

    teacher = [lp for r in rows for lp in r["teacher_logprobs"]]
    served = [lp for s in student for lp in s]
    expected_kl = sum(t - s for t, s in zip(teacher, served, strict=True)) / len(served)  # mean over all tokens
    agree = sum(i % 2 == 0 for a in argmax for i in range(len(a))) / len(served)
    metrics, counts = result["metrics"], result["counts"]
    assert counts["chat/kl_to_teacher"] == len(served) == sum(len(r["answer_ids"]) for r in rows)
    assert math.isclose(metrics["chat/kl_to_teacher"], expected_kl, abs_tol=1e-3)
    assert math.isclose(metrics["chat/teacher_top1_agreement"], agree, abs_tol=1e-9) and 0 < agree < 1
    # the greedy answers come back with the (prompt, answer) samples and a verdict each
    assert counts["chat/non_degenerate_english"] == 2 and len(result["samples"]["chat"]) == 2
    sample = result["samples"]["chat"][0]
    assert sample["prompt"] == QUESTION[0]["content"] and (sample["degenerate"] is None) == (
        degeneracy(sample["answer"]) is None
    )


def test_a_chat_row_with_a_bad_field_is_named(url, tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": QUESTION, "prompt_ids": [1], "answer_ids": "x"}))
    with pytest.raises(SystemExit, match=r"chat.jsonl:1: field 'answer_ids' must be a non-empty list of int"):
        _run_client(url, tmp_path, "--chat", str(tmp_path / "chat.jsonl"))


def test_thinking_off_answers_carry_no_reasoning_and_thinking_on_ones_do(url, tmp_path):
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)

    def ask(thinking: bool):
        extra = {"enable_thinking": thinking, "return_reasoning": True}
        reply = client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, extra_body=extra
        )
        return reply.choices[0].message

    on, off = ask(True), ask(False)
    assert on.model_extra["reasoning_content"] == REASONING and on.content == ANSWER
    assert not off.model_extra.get("reasoning_content")
    # the evaluation counts the same: the micro model answers "four", the gold answer here
    rows = [{"messages": QUESTION, "answer": "four", "family": "words"}] * 2
    (tmp_path / "verifiable.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("--verifiable", str(tmp_path / "verifiable.jsonl"), "--think-tokens", "40", "--direct-tokens", "12")
    result = _run_client(url, tmp_path, *args)
    metrics = result["metrics"]
    assert metrics["verifiable/reasoning_share_on"] == 1.0 and metrics["verifiable/reasoning_count_off"] == 0
    assert metrics["verifiable/accuracy_thinking_on"] == metrics["verifiable/accuracy_thinking_on/words"] == 1.0
    sample = result["samples"]["verifiable"][0]
    assert sample["thinking_on"]["reasoning_content"] == REASONING and sample["thinking_on"]["correct"]
    assert sample["thinking_off"]["reasoning_content"] is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The capital of France is Paris.", None),
        ("Boil water, add the tea bag, wait three minutes.", None),
        ("IAGO.\n\n[Enter]\n\n[Enter]", "distinct words"),
        ("", "0 distinct words"),
        ("cat cat cat cat cat, the dog sat", "'cat' is 4 of 8 tokens"),
        ("Paris is the capital: 巴黎是法国的首都，法国的首都是巴黎", "characters are ASCII"),
        ("I am a man, and I will not be.", None),
    ],
)
def test_degenerate_english_on_hand_examples(text, reason):
    got = degeneracy(text)
    assert got is None if reason is None else (got is not None and reason in got)


def test_per_family_accuracy_on_a_hand_made_response_set():
    def answered(family: str, gold: str, on: str, off: str, on_reasoning: str | None = "7+9=16") -> Answered:
        question = Question([{"role": "user", "content": "?"}], gold, family)
        return Answered(question, Reply(on, on_reasoning), Reply(off, None))

    replies = [
        answered("addition", "737", "The answer is 737.", "The answer is 736."),
        answered("addition", "120", "The answer is 120.", "The answer is 120."),
        answered("addition", "5", "The answer is 6.", "5"),  # off: no "The answer is" sentence, wrong
        answered("weekday", "Monday", "The answer is monday.", "The answer is Tuesday.", on_reasoning="  "),
    ]
    rows = {r.metric: r for r in score(replies)}
    value = {name: r.value for name, r in rows.items()}
    assert value["verifiable/accuracy_thinking_on"] == 0.75 and value["verifiable/accuracy_thinking_off"] == 0.25
    assert value["verifiable/accuracy_thinking_on/addition"] == pytest.approx(2 / 3)
    assert value["verifiable/accuracy_thinking_off/addition"] == pytest.approx(1 / 3)
    assert (
        value["verifiable/accuracy_thinking_on/weekday"] == 1.0
        and value["verifiable/accuracy_thinking_off/weekday"] == 0
    )
    assert rows["verifiable/accuracy_thinking_on/addition"].count == 3
    assert value["verifiable/thinking_gain"] == 0.5
    assert value["verifiable/reasoning_share_on"] == 0.75 and value["verifiable/reasoning_count_off"] == 0


def test_report_shows_the_assistant_section_with_the_served_numbers_and_answers(url, tokenizer, tmp_path):
    from autoglm_train.pipeline.report import write_report
    from tests.pipeline_support import check_report_cells

    data = tmp_path / "eval" / "data"
    data.mkdir(parents=True)
    rows = _chat_items(tokenizer)
    for row in rows:
        row["teacher_top1"] = row["answer_ids"]
    (data / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    question = {"messages": QUESTION, "answer": "four", "family": "words"}
    (data / "verifiable.jsonl").write_text(json.dumps(question) + "\n")
    built = {"generated": 2, "reused": 0, "seconds": 1.5, "answer_tokens": 9, "finished_share": 1.0}
    manifest = {"chat": {"items": 2, "file": "chat.jsonl", "teacher_answers": built}, "verifiable": {"items": 1}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    from autoglm_train.eval.client import main

    args = ["--chat", str(data / "chat.jsonl"), "--verifiable", str(data / "verifiable.jsonl")]
    main(["--base-url", url, "--api-key", KEY, "--json", str(tmp_path / "eval" / "server.json"), *args])

    markdown = write_report(tmp_path).read_text()
    section = markdown.split("## The assistant, through the server", 1)[1]
    for name in ("chat/kl_to_teacher", "chat/non_degenerate_english", "verifiable/accuracy_thinking_on"):
        assert f"| {name} |" in section
    assert "| words | 1 |" in section  # the per-family table
    assert REASONING in section and QUESTION[0]["content"] in section  # a served thinking-on answer, and a prompt
    assert "2 generated and 0 reused" in section
    # every number in the section is the evaluation's own, and the server table no longer repeats these rows
    assert check_report_cells(tmp_path) >= 10
    assert "| chat/kl_to_teacher |" not in markdown.split("## The assistant, through the server", 1)[0]


def _run_dir(root, bundles, tokenizer):
    """A distill run folder as the held-out stage reads it: its config names a local teacher (here the test bundle's
    own decoder, so the student IS the teacher) and a cache folder; ``student/`` holds its tokenizer."""
    from omegaconf import OmegaConf

    run = root / "distill"
    teacher = {"_target_": "autoglm_train.distill.teacher.TeacherSpec", "path": str(bundles.full / "decoder")}
    config = {"teacher": teacher, "paths": {"cache_dir": str(root / "cache")}}
    (run / "hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run / "hydra" / "config.yaml")
    tokenizer.save_pretrained(run / "student")
    return run


def test_held_out_chat_answers_are_the_teachers_samples_under_the_served_rendering(url, bundles, tokenizer, tmp_path):
    from autoglm_train.data.prompt_sources import heldout_chat
    from autoglm_train.data.verifiable.families import FAMILIES
    from autoglm_train.pipeline.heldout_assistant import write_chat, write_verifiable

    run = _run_dir(tmp_path, bundles, tokenizer)
    out = tmp_path / "data"
    out.mkdir()
    stats = write_chat(run, bundles.full, out, count=3, max_new_tokens=6)
    assert stats["items"] == 3 and stats["generated"] == 3 and stats["answer_tokens"] > 0
    rows = [json.loads(line) for line in (out / "chat.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == heldout_chat()[:3]
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
    for row in rows:  # the prompt ids are the server's own for these messages, thinking off
        reply = client.chat.completions.create(
            model=MODEL, messages=row["messages"], max_tokens=1, extra_body={"enable_thinking": False}
        )
        assert reply.usage.prompt_tokens == len(row["prompt_ids"])
        assert tokenizer.decode(row["prompt_ids"]).endswith("<think>\n\n</think>\n\n")
    # the teacher is the served model: the estimate of KL(teacher||student) is 0 and the top-1 ids all agree
    result = _run_client(url, tmp_path, "--chat", str(out / "chat.jsonl"), "--chat-tokens", "4")
    assert abs(result["metrics"]["chat/kl_to_teacher"]) < 1e-3
    assert result["metrics"]["chat/teacher_top1_agreement"] == 1.0
    # a second build reuses every cached answer and writes the same file
    before = (out / "chat.jsonl").read_text()
    again = write_chat(run, bundles.full, out, count=3, max_new_tokens=6)
    assert (again["generated"], again["reused"]) == (0, 3) and (out / "chat.jsonl").read_text() == before
    assert write_verifiable(out, 12) == 12
    questions = [json.loads(line) for line in (out / "verifiable.jsonl").read_text().splitlines()]
    assert {q["family"] for q in questions} == set(FAMILIES) and all(q["answer"] for q in questions)
