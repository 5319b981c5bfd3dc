"""The wire shape of a teacher server's top-k: vLLM's ``/v1/completions`` prompt log-probs, by token id.

Split from :mod:`.teacher_client` (which sends the requests) so the request body and the parsing of both answer
forms (``echo`` + ``logprobs``, and vLLM's ``prompt_logprobs``) can be read and tested on their own. See the client's
docstring for the alignment: cache row t is the top-k over the token after t, i.e. answer entry t+1, and the last
row is the generated token's entry.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOKEN_ID_PREFIX = "token_id:"


class TeacherServerError(RuntimeError):
    """The teacher server could not be used (unreachable after retries, or an answer we cannot read)."""


# --- requests and answers --------------------------------------------------------------------------
def topk_request(model: str, prompt: list[int] | str, k: int, form: str = "echo") -> dict[str, Any]:
    """The body that asks for the top-k of every position of ``prompt`` and of the one token after it."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
    }
    if form == "echo":
        body["echo"] = True
    else:
        body["prompt_logprobs"] = k
    return body


def parse_topk(choice: dict[str, Any], n: int, k: int, form: str = "echo") -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, k], log-probs [n, k]) of an answer to :func:`topk_request` for an ``n``-token prompt, aligned as the
    cache stores them: row t is the top-k over the token after t."""
    entries = _next_token_entries(choice, n, form)
    ids = np.empty((n, k), dtype=np.int64)
    logprobs = np.empty((n, k), dtype=np.float64)
    for t, entry in enumerate(entries):
        best = sorted(_alternatives(entry), key=lambda pair: -pair[1])[:k]  # stable: the server's order on ties
        if len(best) < k:
            raise TeacherServerError(f"the teacher server returned {len(best)} alternatives at position {t}, not {k}")
        ids[t] = [i for i, _ in best]
        logprobs[t] = [lp for _, lp in best]
    return ids, logprobs


def echoed_ids(choice: dict[str, Any]) -> list[int]:
    """The token ids an ``echo`` answer lists (``logprobs.tokens`` as ``token_id:N``), prompt and generated."""
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if not tokens:
        raise TeacherServerError(_NO_LOGPROBS)
    return [_token_id(token) for token in tokens]


_NO_LOGPROBS = (
    "the teacher server answered without prompt log-probs (choices[0].logprobs is empty): it does not support "
    "echo + logprobs on /v1/completions (transformers serve does not); use vLLM or python -m autoglm_train.serve"
)


def _next_token_entries(choice: dict[str, Any], n: int, form: str) -> list[dict[str, Any]]:
    """Per block position t, the answer's entry for the token after t: prompt entry t+1, then the generated one."""
    tops = (choice.get("logprobs") or {}).get("top_logprobs")
    if not tops:
        raise TeacherServerError(_NO_LOGPROBS)
    if form == "echo":
        entries = tops[1 : n + 1]
    else:
        prompt = choice.get("prompt_logprobs")
        if not prompt:
            raise TeacherServerError("the teacher server answered without choices[0].prompt_logprobs")
        entries = [*prompt[1:n], tops[0]]
    if len(entries) != n or any(not entry for entry in entries):
        raise TeacherServerError(
            f"the teacher server returned {len(entries)} scored positions for a {n}-token block (expected {n}, none "
            "empty): does it support echo with max_tokens=1?"
        )
    return entries


def _alternatives(entry: dict[str, Any]) -> list[tuple[int, float]]:
    """``{"token_id:12": -0.1}`` (echo form) or ``{"12": {"logprob": -0.1, ...}}`` (prompt_logprobs) → pairs."""
    return [
        (_token_id(key), float(value["logprob"] if isinstance(value, dict) else value)) for key, value in entry.items()
    ]


def _token_id(key: str) -> int:
    text = key.removeprefix(TOKEN_ID_PREFIX)
    if not text.isdigit():
        raise TeacherServerError(
            f"the teacher server keyed a log-prob by {key!r}, not by token id: it ignored return_tokens_as_token_ids"
        )
    return int(text)


def error_message(response) -> str:
    """The error text of an answer: OpenAI's ``error.message``, old vLLM's ``message``, FastAPI's ``detail``."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text[:300])
    if isinstance(body, dict):
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else body.get("message") or body.get("detail") or error
        return one_line(str(text if text is not None else body)[:300])
    return one_line(str(body)[:300])


def one_line(text: str) -> str:
    return " ".join(text.split())
