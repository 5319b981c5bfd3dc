"""Read conversation rows (``messages`` in the OpenAI/HF form) and validate them one by one.

A distilled assistant learns from conversations, and real conversation dumps hold broken rows (a role the
template does not know, a ``content`` that is a list or null, no assistant turn at all). One bad row should cost
one row, so the checks here raise the text reader's ``_BadRow`` and the rows go through its collector: a skipped
row is counted and reported as ``file:row: kind: messages[i].field: detail`` exactly as a bad text row is, and
``data.strict=true`` turns the first one into an error (:mod:`autoglm_train.data.reader`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from autoglm_train.data.reader import (
    EMPTY_TEXT,
    JSONL_SUFFIXES,
    MISSING_FIELD,
    PARQUET_SUFFIXES,
    WRONG_TYPE,
    Document,
    ReadResult,
    _BadRow,
    _Collector,
    _finish,
    _read_jsonl,
    _read_parquet,
    list_files,
    looks_local,
    read_files,
    read_hub_rows,
)
from autoglm_train.model.thinking import THINK_CLOSE, THINK_OPEN, split_reasoning

UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT = "no_assistant"
ROLES = ("system", "user", "assistant")
REASONING_KEYS = ("reasoning_content", "reasoning")
"""Where an assistant message may carry its thinking (OpenAI-compatible servers use both names)."""
ARROW_SUFFIXES = (".arrow",)
CHAT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES


def _check_turn(i: int, turn: object) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise _BadRow(WRONG_TYPE, f"messages[{i}] must be an object, got {type(turn).__name__}")
    role = turn.get("role")
    if role not in ROLES:
        raise _BadRow(UNKNOWN_ROLE, f"messages[{i}].role: unknown role {role!r} (expected one of {ROLES})")
    content = turn.get("content")
    if not isinstance(content, str):
        raise _BadRow(WRONG_TYPE, f"messages[{i}].content must be a string, got {type(content).__name__}")
    out = {"role": role, "content": content}
    if role != "assistant":
        return out
    for key in REASONING_KEYS:
        value = turn.get(key)
        if value is not None and not isinstance(value, str):
            raise _BadRow(WRONG_TYPE, f"messages[{i}].{key} must be a string, got {type(value).__name__}")
        if value and value.strip() and "reasoning" not in out:
            out["reasoning"] = value.strip()
    if THINK_CLOSE in content:  # thinking written inline: the owner's splitter takes it out of the content
        reasoning, out["content"] = split_reasoning(content, in_reasoning=THINK_OPEN not in content)
        if THINK_CLOSE in out["content"]:
            raise _BadRow(WRONG_TYPE, f"messages[{i}].content: a {THINK_CLOSE} outside a leading think block")
        if reasoning.strip() and "reasoning" not in out:
            out["reasoning"] = reasoning.strip()
    return out


def check_chat_row(row: object, field: str = "messages", prompt_only_ok: bool = False) -> Document:
    """One row → ``{"messages": [{"role", "content"[, "reasoning"]}, ...]}``; raises ``_BadRow`` naming the field.

    ``prompt_only_ok``: a row whose last turn is a (non-empty) user turn is kept too: a prompt for a teacher to answer.
    """
    if not isinstance(row, dict):
        raise _BadRow(WRONG_TYPE, f"row must be an object, got {type(row).__name__}")
    messages = row.get(field)
    if messages is None:
        raise _BadRow(MISSING_FIELD, f"no {field!r} value")
    if not isinstance(messages, list):
        raise _BadRow(WRONG_TYPE, f"{field!r} must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise _BadRow(EMPTY_TEXT, f"{field!r} is empty")
    turns = [_check_turn(i, turn) for i, turn in enumerate(messages)]
    if prompt_only_ok and turns[-1]["role"] == "user":
        if not turns[-1]["content"].strip():
            raise _BadRow(EMPTY_TEXT, f"messages[{len(turns) - 1}].content: the prompt's user turn is empty")
        return {"messages": turns}
    assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if not assistant:
        raise _BadRow(NO_ASSISTANT, f"{field!r} has no assistant turn (nothing to learn from)")
    last = turns[assistant[-1]]
    if not last["content"].strip() and "reasoning" not in last:
        raise _BadRow(EMPTY_TEXT, f"messages[{assistant[-1]}].content: the last assistant turn is empty")
    return {"messages": turns}


class _ChatCollector(_Collector):
    """The text reader's collector, checking rows as conversations instead of text."""

    prompt_only_ok = False

    def row(self, row: object, where: str, text_field: str) -> None:
        try:
            self.add(check_chat_row(row, text_field, self.prompt_only_ok))
        except _BadRow as bad:
            self.skip(where, bad)


def _read_arrow(path: Path, field: str, out: _Collector) -> None:
    import datasets

    for number, row in enumerate(datasets.Dataset.from_file(str(path)), 1):
        out.row(row, f"{path}:{number}", field)


def read_chat(
    path: str, *, field: str = "messages", hub_split: str = "train", strict: bool = False, prompt_only_ok: bool = False
) -> ReadResult:
    """Read conversations from a local .jsonl/.parquet/.arrow file (or a directory of them) or a Hub dataset id.

    Rows keep their source order (the thinking coin of a row is drawn from its position). ``prompt_only_ok``: rows
    ending with a user turn are kept as prompts (``data=assistant``: the teacher answers them).
    """
    if looks_local(path) or Path(path).suffix.lower() in ARROW_SUFFIXES:
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data.path={path!r} does not exist")
        out = _ChatCollector(path, strict)
        out.prompt_only_ok = prompt_only_ok
        readers = dict.fromkeys(JSONL_SUFFIXES, partial(_read_jsonl, text_field=field, out=out))
        readers.update(dict.fromkeys(PARQUET_SUFFIXES, partial(_read_parquet, text_field=field, out=out)))
        readers.update(dict.fromkeys(ARROW_SUFFIXES, partial(_read_arrow, field=field, out=out)))
        read_files(list_files(root, CHAT_SUFFIXES, "data.path"), out, readers)
        return _finish(out)
    hub = _ChatCollector(f"{path}[{hub_split}]", strict)
    hub.prompt_only_ok = prompt_only_ok
    return read_hub_rows(path, hub_split, field, hub, key="data.path")
