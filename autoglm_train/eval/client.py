"""Evaluate a running OpenAI-compatible server on held-out data and print a table.

    python tools/eval_server.py --base-url http://127.0.0.1:8000/v1 --api-key KEY --text heldout.txt \\
        [--teacher-url http://127.0.0.1:8001/v1 | --teacher HF_DIR] [--images digits.jsonl] [--audio speech.jsonl] \\
        [--chat chat.jsonl] [--verifiable verifiable.jsonl]

- **perplexity** (and greedy next-token accuracy) of ``--text`` from ``/v1/completions`` prompt
  logprobs (``echo=true, max_tokens=0, logprobs=1``), exactly what lm-eval's loglikelihood uses;
- **teacher agreement**: how often the served model's most likely next token is the teacher's,
  where both tokenize a text the same way; the teacher is another such server or a local HF model;
- **the assistant** on ``--chat`` (held-out chat prompts with teacher answers: KL(teacher‖student) and top-1
  agreement on the teacher's answers, the share of non-degenerate English answers; :mod:`.assistant`) and
  ``--verifiable`` (held-out questions asked thinking on and off: accuracy, reasoning_content; :mod:`.verifiable`);
- **digit accuracy** of ``--images`` (jsonl: ``{"image": "a.png", "label": "7"}``) and **WER** of
  ``--audio`` (jsonl: ``{"audio": "a.wav", "text": "..."}``) through chat image/audio content parts
  (a row's optional ``prompt`` and ``max_tokens`` override the defaults).

Text files: ``.txt`` (one text per non-empty line) or ``.jsonl`` (a ``text`` field). Media paths in
a jsonl are relative to the jsonl's folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import mimetypes
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIGIT_PROMPT = "Which digit is shown in this image? Answer with the digit."
SPEECH_PROMPT = "Transcribe this audio."


@dataclass
class Row:
    metric: str
    value: float | None
    count: int
    seconds: float
    note: str = ""


@dataclass
class Report:
    model: str
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """A few served answers per kind (``chat``, ``verifiable``), for the report."""

    def table(self) -> str:
        header = ("metric", "value", "n", "seconds", "note")
        body = [
            (r.metric, "n/a" if r.value is None else f"{r.value:.4f}", str(r.count), f"{r.seconds:.1f}", r.note)
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([f"model: {self.model}", fmt(header), rule, *(fmt(line) for line in body)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "metrics": {r.metric: r.value for r in self.rows},
            "counts": {r.metric: r.count for r in self.rows},
            "rows": [vars(r) for r in self.rows],
            "samples": self.samples,
        }


class Server:
    """A thin client for the endpoints the evaluation needs."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None = None, timeout: float = 300.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model or self._first_model()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json={"model": self.model, **body})
        if response.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def _first_model(self) -> str:
        response = self.http.get("/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    def prompt_logprobs(self, text: str) -> dict[str, Any]:
        body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        return self._post("/completions", body)["choices"][0]["logprobs"]

    def token_logprobs(self, ids: list[int]) -> dict[str, Any]:
        """The served log-prob of every token of a token-id prompt, tokens named ``token_id:N``."""
        body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        return self._post("/completions", {**body, "return_tokens_as_token_ids": True})["choices"][0]["logprobs"]

    def chat_message(self, messages: list[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
        """The greedy assistant message for ``messages``; ``extra``: ``enable_thinking``, ``return_reasoning``."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        return self._post("/chat/completions", body)["choices"][0]["message"]

    def chat(self, content: list[dict[str, Any]], max_tokens: int) -> str:
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "enable_thinking": False,
        }
        return self._post("/chat/completions", body)["choices"][0]["message"]["content"] or ""


# --- data -----------------------------------------------------------------------------------
def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    else:
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return texts[:limit] if limit else texts


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# --- metrics ----------------------------------------------------------------------------------
def perplexity(server: Server, texts: list[str]) -> tuple[Row, Row, list[dict[str, Any]]]:
    """Token-level perplexity and greedy next-token accuracy; returns the logprobs for agreement."""
    start, nll, tokens, hits, all_logprobs = time.perf_counter(), 0.0, 0, 0, []
    for text in texts:
        lp = server.prompt_logprobs(text)
        all_logprobs.append(lp)
        for logprob, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            nll -= logprob
            tokens += 1
            hits += bool(top) and logprob >= max(top.values())
    seconds = time.perf_counter() - start
    if tokens == 0:
        return Row("text/perplexity", None, 0, seconds, "no scored tokens"), Row("text/next_token_acc", None, 0, 0), []
    return (
        Row("text/perplexity", math.exp(nll / tokens), tokens, seconds, f"{len(texts)} texts"),
        Row("text/next_token_acc", hits / tokens, tokens, 0.0, "top-1 = actual next token"),
        all_logprobs,
    )


def _top1(top: dict[str, float] | None) -> str | None:
    return max(top, key=top.get) if top else None


def agreement_with_server(student: list[dict[str, Any]], teacher: Server, texts: list[str]) -> Row:
    start, same, total, skipped = time.perf_counter(), 0, 0, 0
    for text, mine in zip(texts, student, strict=True):
        theirs = teacher.prompt_logprobs(text)
        if theirs["tokens"] != mine["tokens"]:
            skipped += 1
            continue
        for a, b in zip(mine["top_logprobs"][1:], theirs["top_logprobs"][1:], strict=True):
            same += _top1(a) == _top1(b)
            total += 1
    return _agreement_row(same, total, skipped, time.perf_counter() - start, f"teacher server {teacher.model}")


def agreement_with_hf(student: list[dict[str, Any]], teacher_path: str, texts: list[str]) -> Row:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    model = AutoModelForCausalLM.from_pretrained(teacher_path, use_safetensors=True).eval()
    same = total = skipped = 0
    for text, mine in zip(texts, student, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids
        pieces = [tokenizer.decode([int(t)]) for t in ids[0]]
        if pieces != mine["tokens"]:
            skipped += 1
            continue
        with torch.no_grad():
            argmax = model(ids).logits[0, :-1].argmax(-1).tolist()
        for a, b in zip(mine["top_logprobs"][1:], argmax, strict=True):
            same += _top1(a) == tokenizer.decode([b])
            total += 1
    return _agreement_row(same, total, skipped, time.perf_counter() - start, f"teacher {teacher_path}")


def _agreement_row(same: int, total: int, skipped: int, seconds: float, who: str) -> Row:
    note = who + (f"; {skipped} text(s) tokenized differently, skipped" if skipped else "")
    return Row("text/teacher_top1_agreement", same / total if total else None, total, seconds, note)


def digit_accuracy_row(server: Server, rows: list[dict[str, Any]], root: Path) -> Row:
    from autoglm_train.eval.text_metrics import digit_accuracy

    start = time.perf_counter()
    outputs, labels = [], []
    for row in rows:
        content = [
            {"type": "text", "text": row.get("prompt", DIGIT_PROMPT)},
            {"type": "image_url", "image_url": {"url": data_url(root / row["image"])}},
        ]
        outputs.append(server.chat(content, max_tokens=int(row.get("max_tokens", 8))))
        labels.append(str(row["label"]))
    value = digit_accuracy(labels, outputs) if rows else None
    return Row(
        "vision/digit_accuracy", value, len(rows), time.perf_counter() - start, "first digit named in the answer"
    )


def wer_row(server: Server, rows: list[dict[str, Any]], root: Path, max_tokens: int) -> Row:
    from autoglm_train.eval.text_metrics import wer

    start = time.perf_counter()
    refs, hyps = [], []
    for row in rows:
        audio = base64.b64encode((root / row["audio"]).read_bytes()).decode()
        content = [
            {"type": "text", "text": row.get("prompt", SPEECH_PROMPT)},
            {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
        ]
        hyps.append(server.chat(content, max_tokens=int(row.get("max_tokens", max_tokens))))
        refs.append(row["text"])
    value = wer(refs, hyps) if rows else None
    return Row("speech/wer", value, len(rows), time.perf_counter() - start, "corpus WER, normalised text")


# --- entry point ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/eval_server.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("AUTOGLM_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", help="model id (default: the first one /v1/models lists)")
    p.add_argument("--text", help="held-out texts (.txt one per line, or .jsonl with 'text')")
    p.add_argument("--max-texts", type=int, default=200)
    p.add_argument("--teacher", help="local HF teacher dir/id for top-1 agreement")
    p.add_argument("--teacher-url", help="OpenAI-compatible teacher server for top-1 agreement")
    p.add_argument("--teacher-model")
    p.add_argument("--teacher-api-key")
    p.add_argument("--images", help="jsonl of {'image': path, 'label': digit[, 'prompt']}")
    p.add_argument("--audio", help="jsonl of {'audio': wav path, 'text': reference[, 'prompt']}")
    p.add_argument("--max-items", type=int, default=100, help="images / clips evaluated at most")
    p.add_argument("--chat", help="chat.jsonl of held-out prompts with teacher answers (pipeline.heldout)")
    p.add_argument("--verifiable", help="verifiable.jsonl of held-out questions with answers and families")
    p.add_argument("--max-prompts", type=int, default=1000, help="chat prompts and questions evaluated at most, each")
    p.add_argument("--chat-tokens", type=int, default=48, help="tokens per greedy chat answer")
    p.add_argument("--think-tokens", type=int, default=160, help="tokens per thinking-on answer")
    p.add_argument("--direct-tokens", type=int, default=24, help="tokens per thinking-off answer")
    p.add_argument("--workers", type=int, default=8, help="chat requests in flight (the server batches them)")
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds; chat items not started by then skip")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per transcription")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not (args.text or args.images or args.audio or args.chat or args.verifiable):
        p.error("nothing to evaluate: give --text, --images, --audio, --chat and/or --verifiable")
    if (args.teacher or args.teacher_url) and not args.text:
        p.error("teacher agreement needs --text")
    return args


def evaluate(args: argparse.Namespace) -> Report:
    server = Server(args.base_url, args.api_key, args.model)
    report = Report(model=server.model)
    if args.text:
        texts = read_texts(args.text, args.max_texts)
        ppl, acc, logprobs = perplexity(server, texts)
        report.rows += [ppl, acc]
        if args.teacher_url:
            teacher = Server(args.teacher_url, args.teacher_api_key or args.api_key, args.teacher_model)
            report.rows.append(agreement_with_server(logprobs, teacher, texts))
        elif args.teacher:
            report.rows.append(agreement_with_hf(logprobs, args.teacher, texts))
    if args.images:
        report.rows.append(
            digit_accuracy_row(server, read_jsonl(args.images, args.max_items), Path(args.images).parent)
        )
    if args.audio:
        rows = read_jsonl(args.audio, args.max_items)
        report.rows.append(wer_row(server, rows, Path(args.audio).parent, args.max_tokens))
    assistant_rows(server, report, args)
    return report


def assistant_rows(server: Server, report: Report, args: argparse.Namespace) -> None:
    """The held-out chat and verifiable metrics (and a few served answers) of ``--chat`` / ``--verifiable``."""
    from autoglm_train.eval import assistant, verifiable

    deadline = time.monotonic() + args.time_limit
    if args.chat:
        items = assistant.read_chat(args.chat, args.max_prompts)
        report.rows += assistant.kl_rows(server, items, args.workers, deadline)
        row, report.samples["chat"] = assistant.english_row(server, items, args.chat_tokens, args.workers, deadline)
        report.rows.append(row)
    if args.verifiable:
        questions = verifiable.read_verifiable(args.verifiable, args.max_prompts)
        budgets = (args.think_tokens, args.direct_tokens)
        rows, report.samples["verifiable"] = verifiable.verifiable_rows(
            server, questions, *budgets, args.workers, deadline
        )
        report.rows += rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except Exception as err:  # a network or server error: one clear line, not a traceback
        sys.exit(f"error: {err}")
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


if __name__ == "__main__":
    main()
