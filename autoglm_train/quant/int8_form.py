"""recipe=distill's last step under ``quant.ptq``: the int8 serving form of the trained student.

Quantizes a copy of the float student, scores it against the float one on held-out batches
(KL, top-1 agreement, perplexity), and writes it as ``student_int8/`` in the export's layout.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from autoglm_train.quant.compare import compare_to_reference
from autoglm_train.quant.int8_dir import save_int8_dir
from autoglm_train.quant.ptq import PTQSpec, quantize_model
from autoglm_train.quant.size import weight_bytes

log = logging.getLogger(__name__)


def int8_form(
    student: nn.Module,
    spec: PTQSpec,
    batches: Iterable,
    vocab_size: int | None,
    out_dir: str | Path | None,
    tokenizer=None,
) -> dict[str, float | str]:
    """PTQ of ``student`` (left untouched); returns ``ptq/*`` metrics for the run summary."""
    student = student.eval()
    qmodel = copy.deepcopy(student)
    quantize_model(qmodel, spec)
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
    if spec.save and out_dir is not None:
        metrics["ptq/dir"] = str(save_int8_dir(qmodel, out_dir, spec.scheme, tokenizer))
    log.info("int8 student (%s): %s", spec.scheme, {k: v for k, v in metrics.items() if k != "ptq/scheme"})
    return metrics
