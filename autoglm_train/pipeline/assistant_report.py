"""The report's "The assistant, through the server" section: chat and verifiable metrics, served answers, times.

Read from ``eval/server.json`` (the evaluation client's rows and samples), ``eval/data/manifest.json`` (the
held-out sets and the teacher answers' build) and ``pipeline.json`` (stage times); nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoglm_train.pipeline.render import Cell, Code, Document, Heading, Para, Table, fmt, text
from autoglm_train.pipeline.sources import read_json

ASSISTANT_PREFIXES = ("chat/", "verifiable/")
SERVER = "eval/server.json"
MODES = ("on", "off")


def _metric_cell(result: dict[str, Any], name: str) -> Cell:
    value = (result.get("metrics") or {}).get(name)
    return Cell(fmt(value), value, f"{SERVER}#metrics.{name}")


def _metrics_table(result: dict[str, Any]) -> Table:
    """The overall rows (per-family accuracy is the next table)."""
    rows = [
        [
            text(r["metric"]),
            _metric_cell(result, r["metric"]),
            *(text(f"{r['count']:,}"), text(f"{r['seconds']:.1f}"), text(r.get("note", ""))),
        ]
        for r in result["rows"]
        if r["metric"].startswith(ASSISTANT_PREFIXES) and r["metric"].count("/") == 1
    ]
    return Table(
        ["metric", "value", "n", "seconds", "note"],
        rows,
        "assistant",
        "Held-out chat prompts (hand-written, in no training set): KL(teacher‖student) in nats per answer token, "
        "estimated as the mean of log p_teacher − log p_student over the teacher's own temperature-1 answers "
        "(served log-probs from `/v1/completions` with the token ids, `echo`, `max_tokens=0`), top-1 agreement on "
        "the same tokens, and the share of the student's greedy thinking-off answers that are plain English "
        "(≥ 4 distinct words, no token > 40%, ≥ 80% ASCII). Held-out verifiable questions through "
        "`/v1/chat/completions` with `enable_thinking` true and false, greedy: exact match of the content's "
        "'The answer is X.'; `reasoning_content` asked for with `return_reasoning: true` in both modes.",
    )


def _family_table(result: dict[str, Any]) -> Table | None:
    counts = result.get("counts") or {}
    prefix = "verifiable/accuracy_thinking_on/"
    families = sorted(name[len(prefix) :] for name in counts if name.startswith(prefix))
    if not families:
        return None
    rows = [
        [text(family), text(f"{counts[prefix + family]:,}")]
        + [_metric_cell(result, f"verifiable/accuracy_thinking_{mode}/{family}") for mode in MODES]
        for family in families
    ]
    return Table(["family", "questions", "accuracy, thinking on", "accuracy, thinking off"], rows, "assistant_families")


def _chat_samples(samples: list[dict[str, Any]]) -> Code:
    lines = []
    for s in samples:
        verdict = "plain English" if s.get("degenerate") is None else f"degenerate: {s['degenerate']}"
        lines.append(f"user: {s['prompt']}\nassistant: {s['answer']!r}   [{verdict}]")
    return Code("\n\n".join(lines))


def _verifiable_samples(samples: list[dict[str, Any]]) -> Code:
    lines = []
    for s in samples:
        on, off = s["thinking_on"], s["thinking_off"]
        lines.append(
            f"user ({s['family']}, gold {s['answer']}): {s['question']}\n"
            f"thinking on  → reasoning_content: {on['reasoning_content']!r}\n"
            f"               content: {on['content']!r}   [{'correct' if on['correct'] else 'wrong'}]\n"
            f"thinking off → reasoning_content: {off['reasoning_content']!r}\n"
            f"               content: {off['content']!r}   [{'correct' if off['correct'] else 'wrong'}]"
        )
    return Code("\n\n".join(lines))


def _build_note(root: Path) -> Para | None:
    """Where the held-out sets came from, the teacher answers' build, and the two stages' times."""
    data = read_json(root / "eval" / "data" / "manifest.json") or {}
    stages = (read_json(root / "pipeline.json") or {}).get("stages", {})
    parts = []
    chat = data.get("chat")
    if chat:
        built = chat.get("teacher_answers") or {}
        parts.append(
            f"{chat['items']} held-out chat prompts; the teacher's answers ({built.get('answer_tokens', '?')} tokens, "
            f"a share {fmt(built.get('finished_share'))} of them finished) were "
            f"{built.get('generated', '?')} generated and {built.get('reused', '?')} reused from the cache "
            f"in {fmt(built.get('seconds'))} s"
        )
    if data.get("verifiable"):
        parts.append(f"{data['verifiable']['items']} held-out verifiable questions")
    times = [f"`{n}` {fmt(stages[n].get('seconds'))} s" for n in ("heldout", "serve_eval") if n in stages]
    if times:
        parts.append("stage wall times " + ", ".join(times))
    return Para("; ".join(parts) + " (`eval/data/manifest.json`, `pipeline.json`).") if parts else None


def assistant_section(doc: Document, root: Path) -> None:
    doc.add(Heading("The assistant, through the server"))
    result = read_json(root / SERVER)
    if result is None or not any(r["metric"].startswith(ASSISTANT_PREFIXES) for r in result.get("rows", [])):
        doc.add(Para("Not run yet (stages `heldout` and `serve_eval` with held-out chat and verifiable sets)."))
        return
    doc.add(_metrics_table(result))
    families = _family_table(result)
    if families is not None:
        doc.add(families)
    note = _build_note(root)
    if note is not None:
        doc.add(note)
    samples = result.get("samples") or {}
    if samples.get("chat"):
        doc.add(Para("Served chat answers (greedy, thinking off):"), _chat_samples(samples["chat"]))
    if samples.get("verifiable"):
        doc.add(
            Para("Served verifiable answers, thinking on and off (the reasoning as `reasoning_content`):"),
            _verifiable_samples(samples["verifiable"]),
        )
    doc.add(Para(f"Source: `{SERVER}` (rows and samples) of `bundle/` served as '{result['model']}'."))
