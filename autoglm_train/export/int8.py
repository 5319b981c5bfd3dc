"""The bundle's ``int8/`` form: the file PTQ measured when it fits, otherwise quantized here, the same way.

The layout and its one writer are :mod:`autoglm_train.quant.int8_layout` (the standard TorchAoConfig
directory transformers loads alone). ``recipe=distill`` writes ``student_int8/`` with that writer and
measures it (``ptq/*`` in ``run_summary.json``). When the export's decoder is that run's student, the
measured file is shipped as it is, so the served int8 numbers are the measured ones; it is reused only
when its record says it was written from this decoder's content (sha256 of ``config.json`` and the
weight files, not the path) with the scheme the bundle serves. Otherwise the decoder is quantized again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from autoglm_train.quant.int8_layout import (
    PTQ_DIR,
    SERVED,
    VERSION,
    WEIGHTS,
    copy_tokenizer,
    is_standard_int8,
    manifest_entry,
    read_record,
    source_record,
    write_int8,
)

log = logging.getLogger(__name__)


def export_int8(src: Path, out: Path, tokenizer_dir: Path, measured: Path | None = None) -> dict[str, Any]:
    """Write the bundle's ``int8/`` into ``out``; returns its manifest entry.

    Args:
        src: the fp32 decoder being exported.
        out: the bundle's ``int8/`` directory (created).
        tokenizer_dir: the bundle's ``decoder/``, whose tokenizer, chat template and generation config ship.
        measured: an int8 form to reuse when it was written from ``src`` (default: ``src``'s sibling
            ``student_int8/``, as ``recipe=distill`` lays out a run).
    """
    measured = Path(measured) if measured is not None else src.parent / PTQ_DIR
    why = reuse_refusal(measured, src)
    if why is None:
        out.mkdir(parents=True)
        for name in (WEIGHTS, "config.json"):
            shutil.copyfile(measured / name, out / name)
        copy_tokenizer(tokenizer_dir, out)
        log.info("int8/: %s reused as-is (written from this decoder's weights)", measured)
        return {**manifest_entry(out), "reused_from": str(measured)}
    log.info("int8/: quantizing %s (%s)", src, why)
    return {**write_int8(src, out, tokenizer_dir), "reused_from": None, "not_reused": why}


def reuse_refusal(measured: Path, src: Path) -> str | None:
    """Why ``measured`` cannot ship as the bundle's ``int8/`` for decoder ``src``; None when it can."""
    if not measured.is_dir():
        return f"no {measured}"
    if not is_standard_int8(measured):
        return f"{measured} is not the standard int8 form"
    record = read_record(measured)
    if not record or record.get("version") != VERSION:
        return f"{measured} has no int8 record of version {VERSION}"
    if {"scheme": record.get("scheme"), "head": record.get("head")} != SERVED:
        return f"{measured} holds scheme={record.get('scheme')} head={record.get('head')}, the bundle serves {SERVED}"
    if record.get("source") != source_record(src):
        return f"{measured} was written from other weights or another config than {src}"
    return None
