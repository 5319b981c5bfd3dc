"""A teacher on another machine: its top-k log-probs over an OpenAI-compatible ``/v1/completions``.

Why: a 30-70B teacher runs on its own GPUs (vLLM with tensor parallelism) while the student trains elsewhere. The
offline top-k cache (:mod:`.topk_cache`, its one writer) is then filled over HTTP instead of by a model in this
process, and training reads the cache exactly as it does for a local teacher.

The request is vLLM's (ms-swift's GKD sends the same): the block as token ids (never re-tokenised), ``echo`` with
``logprobs=k``, ``max_tokens=1`` and ``return_tokens_as_token_ids``, so alternatives come back keyed
``"token_id:123"``. The answer's ``top_logprobs[j]`` is the top-k over token j given tokens < j (None at j=0). The
cache holds at position t the top-k over the token *after* t given tokens <= t, so position t reads entry t+1 and
the last position reads the generated token's entry: that is what the one generated token is for. vLLM's own
``prompt_logprobs`` field (``{"123": {"logprob": ...}}`` per prompt position) is read the same way
(``request_form="prompt_logprobs"``). vLLM adds the scored token itself to an entry when it is outside the top-k;
the k best are kept.

Before any block is sent, :meth:`TeacherServer.preflight` refuses a wrong teacher with one line each: another
tokenizer (a probe text's echoed ids differ from ours), another vocabulary (the range of token ids the server
accepts), a ``top_k`` above the server's ``--max-logprobs`` (read from its 400 answer), a server that returns no
prompt log-probs at all. The served model's name (and vLLM's ``root``, the weights' path) and a fingerprint of its
tokenizer and vocabulary go into the cache key and ``meta.json``, so a cache from another teacher is never reused.
Not its answers: vLLM's log-probs vary in the last bits with the batch they ran in, and a key that moved with them
would throw away a half-built cache after a restart; serve a retrained teacher under a new name.

Requests run ``concurrency`` at a time on threads (httpx), retried with exponential backoff on 429, 5xx, timeouts
and connection errors. A server that stays down fails the build with one line; shards already written stay, and the
next run resumes at the first missing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoglm_train.distill.teacher_wire import (
    TeacherServerError,
    echoed_ids,
    error_message,
    one_line,
    parse_topk,
    topk_request,
)
from autoglm_train.distill.vocab import VocabMismatchError
from autoglm_train.errors import ConfigValueError

log = logging.getLogger(__name__)

REQUEST_FORMS = ("echo", "prompt_logprobs")
PROBE = 'The quick brown fox jumps over the lazy dog. Ünïcödé, 1234 + 5678 = 6912; "quotes" and\ttabs.\n'
_MAX_BACKOFF_S = 60.0
_MAX_VOCAB = 1 << 24


class TeacherMismatchError(VocabMismatchError):
    """The server's teacher is not the one this run distills from (tokenizer, vocabulary or top-k allowance)."""


@dataclass
class ServerTeacherSpec:
    """``teacher=server``: a teacher behind an OpenAI-compatible endpoint that returns prompt log-probs by token id."""

    url: str
    """Base URL of the API, e.g. ``http://node:8000/v1``."""
    model: str | None = None
    """Served model name; None: the server's only model (``/v1/models``)."""
    tokenizer: str | None = None
    """The teacher's tokenizer: a local dir or hub id (only tokenizer files are read). None: the served model's name
    (vLLM names a model by its hub id or path). The probe check makes sure it is the server's."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer key; prefer ``api_key_env`` (a key on the command line ends up in Hydra's saved overrides)."""
    api_key_env: str | None = "TEACHER_API_KEY"
    """Environment variable holding the key, read when ``api_key`` is null. The key itself is never logged."""
    top_k: int = 32
    """Log-probs per position (the cache's k); at most the server's ``--max-logprobs``."""
    concurrency: int = 8
    """Requests in flight at once (one block each)."""
    timeout_s: float = 300.0
    """Seconds one request may take before it counts as failed (and is retried)."""
    retries: int = 5
    """Retries of a failed request (429, 5xx, timeout, connection error), waiting backoff_s, 2·backoff_s, ..."""
    backoff_s: float = 1.0
    request_form: str = "echo"
    """``echo``: prompt log-probs in ``logprobs.top_logprobs`` (OpenAI's legacy shape, vLLM and ours);
    ``prompt_logprobs``: vLLM's ``prompt_logprobs`` field."""
    probe: str = PROBE
    """Text sent once to compare the server's token ids with ours."""

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url or ""):
            raise ConfigValueError(f"teacher.url={self.url!r}: expected http(s)://host:port/v1")
        for name in ("top_k", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigValueError(f"teacher.{name}={getattr(self, name)} must be >= 1")
        if self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ConfigValueError("teacher.retries and teacher.backoff_s must be >= 0, teacher.timeout_s > 0")
        if self.request_form not in REQUEST_FORMS:
            raise ConfigValueError(f"teacher.request_form={self.request_form!r}; expected one of {REQUEST_FORMS}")

    def key(self) -> str | None:
        return self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None) or None


@dataclass(frozen=True)
class TeacherIdentity:
    """Who answered the preflight: recorded in the cache key and ``meta.json``."""

    model: str
    vocab_size: int
    """Token ids the server accepts: 0 .. vocab_size - 1."""
    fingerprint: str
    """sha256 of the served model's name and root, its vocabulary size and its token ids for the probe."""

    @property
    def teacher_id(self) -> str:
        return f"server:{self.model}:{self.fingerprint}"


# --- the client -----------------------------------------------------------------------------------------------
class _Refused(Exception):
    """A 4xx answer other than 429: the request itself is at fault, retrying cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class TeacherServer:
    """Talks to one teacher server: :meth:`preflight` once, then :meth:`score` as the cache's scorer.

    Args:
        spec: where the server is and how to talk to it.
        transport: an ``httpx`` transport (tests); default the network.
    """

    def __init__(self, spec: ServerTeacherSpec, transport: Any = None) -> None:
        import httpx

        self.spec = spec
        self.url = spec.url.rstrip("/")
        key = spec.key()
        self._http = httpx.Client(
            base_url=self.url + "/",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=spec.timeout_s,
            limits=httpx.Limits(max_connections=spec.concurrency + 1, max_keepalive_connections=spec.concurrency + 1),
            transport=transport,
        )
        self.model = spec.model
        self.root = ""
        """vLLM's ``root`` of the served model (the path or hub id its weights came from), when the server says."""
        self.stats = {"requests": 0, "retries": 0, "bytes_sent": 0, "bytes_received": 0, "tokens": 0}
        """What went over the wire (request bodies, response bodies) for how many block tokens."""
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._http.close()

    def __enter__(self) -> TeacherServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- checks before any heavy work ---------------------------------------------------------------------------
    def served_model(self) -> str:
        """The model name requests carry: ``spec.model`` if the server lists it, else the server's only model."""
        cards = [card for card in self._request("GET", "models").get("data", []) if isinstance(card, dict)]
        listed = [card.get("id") for card in cards]
        if self.spec.model:
            if listed and self.spec.model not in listed:
                raise TeacherMismatchError(
                    f"teacher server {self.url} serves {listed}, not teacher.model={self.spec.model!r}"
                )
            self.model = self.spec.model
        elif len(listed) == 1:
            self.model = listed[0]
        else:
            raise ConfigValueError(f"teacher server {self.url} serves {listed or 'no model'}: set teacher.model")
        self.root = next((str(card.get("root") or "") for card in cards if card.get("id") == self.model), "")
        return self.model

    def preflight(self, tokenizer, vocab_size: int) -> TeacherIdentity:
        """Refuse a teacher that is not the one ``tokenizer`` belongs to, or that cannot give ``top_k`` log-probs.

        Args:
            tokenizer: the teacher's tokenizer on this side (the student's ids).
            vocab_size: the token ids the KD loss compares (the teacher tokenizer's size).

        Raises:
            TeacherMismatchError: one line naming what differs.
        """
        model = self.served_model()
        ours = list(tokenizer(self.spec.probe)["input_ids"])
        k = self.spec.top_k
        try:
            answer = self._request("POST", "completions", topk_request(model, self.spec.probe, k))
        except _Refused as err:
            if "logprobs" in err.message.lower():
                raise TeacherMismatchError(
                    f"teacher.top_k={k} is more than teacher server {self.url} allows ({err.message}); lower "
                    f"teacher.top_k or restart the server with --max-logprobs {k}"
                ) from None
            raise TeacherServerError(f"teacher server {self.url} refused the probe request: {err}") from None
        choice = answer["choices"][0]
        theirs = echoed_ids(choice)[: len(ours)]
        if theirs != ours:
            at = next(
                (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours))
            )
            raise TeacherMismatchError(
                f"teacher server {self.url} ({model}) tokenizes the probe differently from teacher.tokenizer: "
                f"first difference at token {at} (server {theirs[at : at + 3]}, ours {ours[at : at + 3]}); "
                "the server's teacher is not the one this run distills from"
            )
        parse_topk(choice, len(ours), k)  # the answer has k alternatives by id at every position
        served_vocab = self._vocab_size(model, vocab_size)
        if served_vocab < vocab_size:
            raise TeacherMismatchError(
                f"teacher server {self.url} ({model}) accepts token ids 0..{served_vocab - 1}, but teacher.tokenizer "
                f"has {vocab_size} tokens: another vocabulary"
            )
        record = json.dumps([model, self.root, served_vocab, ours])
        identity = TeacherIdentity(model, served_vocab, hashlib.sha256(record.encode()).hexdigest()[:16])
        log.info(
            "teacher server %s: model %s, %d token ids, probe tokenized alike (%d tokens), top-%d allowed, "
            "fingerprint %s",
            self.url,
            model,
            served_vocab,
            len(ours),
            k,
            identity.fingerprint,
        )
        return identity

    def _vocab_size(self, model: str, expected: int) -> int:
        """How many token ids the server accepts in a prompt (it refuses the others with a 400).

        Two requests when it is ``expected``; otherwise a search, so the refusal can say the server's number.
        """
        below, at = self._accepts(model, expected - 1), self._accepts(model, expected)
        if below and not at:
            return expected
        lo, hi = (expected, expected * 2) if at else (0, expected - 1)  # invariant: accepts(lo), refuses(hi)
        while at and hi < _MAX_VOCAB and self._accepts(model, hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._accepts(model, mid) else (lo, mid)
        return lo + 1

    def _accepts(self, model: str, token_id: int) -> bool:
        try:
            self._request("POST", "completions", {"model": model, "prompt": [token_id], "max_tokens": 1})
        except _Refused as err:
            if err.status == 400:
                return False
            raise TeacherServerError(f"teacher server {self.url}: {err}") from None
        return True

    # --- the cache's scorer ---------------------------------------------------------------------------------------
    def score(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A :data:`~.topk_cache.Scorer`: every block one request, ``concurrency`` in flight."""
        if self.model is None:
            self.served_model()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.spec.concurrency, thread_name_prefix="teacher-http")
        futures = [self._pool.submit(self.score_block, row.tolist()) for row in blocks]
        try:
            results = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return np.stack([ids for ids, _ in results]), np.stack([lps for _, lps in results])

    def score_block(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        body = topk_request(self.model, ids, self.spec.top_k, self.spec.request_form)
        try:
            answer = self._request("POST", "completions", body)
        except _Refused as err:
            raise TeacherServerError(f"teacher server {self.url} refused a block: {err}") from None
        with self._lock:
            self.stats["tokens"] += len(ids)
        return parse_topk(answer["choices"][0], len(ids), self.spec.top_k, self.spec.request_form)

    # --- HTTP with retries ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        """The JSON answer; 429, 5xx, timeouts and connection errors are retried with exponential backoff.

        Raises:
            _Refused: a 4xx other than 429 (the request is at fault).
            TeacherServerError: still failing after ``spec.retries`` retries.
        """
        import httpx

        attempts = self.spec.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.spec.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                log.warning(
                    "teacher server %s: %s; retry %d/%d in %.1f s", self.url, last, attempt, attempts - 1, delay
                )
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(delay)
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as err:  # connection refused/reset, timeouts, a server that died mid-answer
                last = f"{type(err).__name__}: {one_line(str(err)) or 'no answer'}"
                continue
            with self._lock:
                self.stats["requests"] += 1
                self.stats["bytes_sent"] += len(response.request.content or b"")
                self.stats["bytes_received"] += len(response.content)
            if response.status_code < 400:
                return response.json()
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {error_message(response)}"
                continue
            raise _Refused(response.status_code, error_message(response))
        raise TeacherServerError(
            f"teacher server {self.url} unreachable after {attempts} tries ({last}); the shards written so far are "
            "kept: rerun to resume"
        )
