"""recipe=distill's last step under ``quant.ptq``: the int8 serving form of the trained student, measured.

The saved float student (``student/``) is quantized into ``student_int8/`` by the one int8 writer
(:func:`~autoglm_train.quant.int8_layout.write_int8`, the export's too). That directory is loaded back,
with the inference modules of the spec's kernel as the server builds them, and scored against the float
student on held-out batches (KL, top-1 agreement, perplexity). So ``ptq/*`` are the numbers of the file
on disk, which the export ships as the bundle's ``int8/`` while the student is unchanged. (The loaded model
is also bit-identical to :func:`~autoglm_train.quant.ptq.quantize_model` of the float student in memory:
``tests/test_quant_ptq.py``.)
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from autoglm_train.quant.compare import compare_to_reference
from autoglm_train.quant.int8_layout import load_int8, write_int8
from autoglm_train.quant.ptq import PTQSpec
from autoglm_train.quant.size import weight_bytes

log = logging.getLogger(__name__)


def int8_form(
    student: nn.Module,
    student_dir: str | Path,
    spec: PTQSpec,
    batches: Iterable,
    vocab_size: int | None,
    out_dir: str | Path | None,
) -> dict[str, float | str]:
    """PTQ of the float student saved in ``student_dir`` (``student``: the same weights, in memory, left
    untouched); returns ``ptq/*`` metrics for the run summary.

    The form is written to ``out_dir`` when ``spec.save`` (atomically: a temporary sibling, then one
    rename), otherwise to a temporary directory that is deleted after it was measured.
    """
    student = student.eval()
    keep = spec.save and out_dir is not None
    parent = Path(out_dir).parent if keep else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".student_int8.", dir=parent))
    try:
        write_int8(Path(student_dir), tmp / "form", tokenizer_dir=Path(student_dir), scheme=spec.scheme, head=spec.head)
        metrics = _measure(student, tmp / "form", spec, batches, vocab_size)
        if keep:
            out = Path(out_dir)
            if out.exists():
                shutil.rmtree(out)
            (tmp / "form").chmod(0o755)
            os.replace(tmp / "form", out)
            metrics["ptq/dir"] = str(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("int8 student (%s): %s", spec.scheme, {k: v for k, v in metrics.items() if k != "ptq/scheme"})
    return metrics


def _measure(
    student: nn.Module, form: Path, spec: PTQSpec, batches: Iterable, vocab_size: int | None
) -> dict[str, float | str]:
    """``ptq/*`` of the int8 form in ``form``, loaded back with the kernel ``spec`` names."""
    qmodel = load_int8(form, kernel=spec.kernel)
    metrics: dict[str, float | str] = {
        "ptq/scheme": spec.scheme,
        "ptq/weight_bytes": weight_bytes(qmodel),
        "ptq/weight_bytes_ratio": weight_bytes(qmodel) / weight_bytes(student),
    }
    if spec.eval_batches:
        scores = compare_to_reference(
            student, {"int8": qmodel}, itertools.islice(batches, spec.eval_batches), vocab_size
        )
        ref, q = scores["reference"], scores["int8"]
        metrics.update(
            {
                "ptq/ppl": q.ppl,
                "ptq/float_ppl": ref.ppl,
                "ptq/kl_to_float": q.kl_to_ref,
                "ptq/top1_agreement_with_float": q.top1_agreement,
            }
        )
    return metrics
