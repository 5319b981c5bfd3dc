"""One perplexity / KL / top-1 agreement: validation, the int8 comparison and export parity give the numbers a
direct computation on whole logits gives."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoglm_train.model.next_token_metrics import next_token_sums, perplexity
from tests.conftest import micro_spec

V = 300


def _direct(logits, reference, labels=None, vocab=None):
    """(ppl, mean KL(ref ‖ model), top-1 agreement) written out on whole [N, V] logits."""
    ppl = math.exp(F.cross_entropy(logits, labels).item()) if labels is not None else None
    mine, ref = logits[:, :vocab], reference[:, :vocab]
    p_ref = ref.softmax(-1)
    kl = (p_ref * (ref.log_softmax(-1) - mine.log_softmax(-1))).sum(-1).mean().item()
    agree = (mine.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return ppl, kl, agree


def _micro(seed: int):
    from autoglm_train.model.decoder import build_decoder

    torch.manual_seed(seed)
    return build_decoder(micro_spec(), V, 0, 1).eval()


def test_the_sums_are_the_textbook_definitions():
    g = torch.Generator().manual_seed(0)
    logits, reference = torch.randn(40, V, generator=g), torch.randn(40, V, generator=g)
    labels = torch.randint(0, V, (40,), generator=g)
    sums = next_token_sums(logits, labels, reference, vocab_size=250)
    ppl, kl, agree = _direct(logits, reference, labels, vocab=250)
    assert perplexity(float(sums["nll"]), 40) == pytest.approx(ppl, rel=1e-6)
    assert float(sums["kl"]) / 40 == pytest.approx(kl, rel=1e-5)
    assert int(sums["agree"]) / 40 == agree
    assert perplexity(1e4, 1) == math.exp(50.0) and perplexity(0.0, 0) == 1.0  # capped; no tokens


def test_validation_metrics_equal_the_direct_computation():
    from autoglm_train.distill.teacher_agreement import teacher_agreement_and_kl

    torch.manual_seed(0)
    teacher_head = nn.Linear(16, V + 6, bias=False)
    student_head = copy.deepcopy(teacher_head)
    student_head.weight.data += 0.05 * torch.randn_like(student_head.weight)
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, V, (2, 9))
    labels[0, :3] = -100
    agree, kl = teacher_agreement_and_kl(hidden, student_head, hidden, teacher_head, labels, V, chunk_size=4)
    keep = hidden[labels != -100]
    with torch.no_grad():
        _, want_kl, want_agree = _direct(student_head(keep), teacher_head(keep), vocab=V)
    assert 0.0 < want_agree < 1.0
    assert agree.item() == pytest.approx(want_agree, abs=1e-7)
    assert kl.item() == pytest.approx(want_kl, rel=1e-5)


def test_int8_comparison_equals_the_direct_computation():
    from autoglm_train.quant.compare import compare_to_reference

    reference, other = _micro(0), _micro(1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (2, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    scores = compare_to_reference(reference, {"other": other}, [{"input_ids": ids, "labels": labels}], V - 20)
    keep = labels != -100
    with torch.no_grad():
        ref_logits, logits = reference(input_ids=ids).logits[keep], other(input_ids=ids).logits[keep]
    ppl, kl, agree = _direct(logits, ref_logits, labels[keep], vocab=V - 20)
    got = scores["other"]
    assert got.ppl == pytest.approx(ppl, rel=1e-5) and got.kl_to_ref == pytest.approx(kl, rel=1e-5)
    assert got.top1_agreement == pytest.approx(agree) and 0.0 < agree < 1.0
    assert scores["reference"].kl_to_ref == 0.0 and scores["reference"].top1_agreement == 1.0


def test_export_parity_agreement_equals_the_direct_computation():
    from autoglm_train.export.parity import Reference, Tolerance, TorchRunner, compare

    reference, other = TorchRunner(_micro(0)), TorchRunner(_micro(1))
    ids = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6]]
    greedy = [reference.greedy_with_margins(x, 3) for x in ids]
    ref = Reference(["a", "b"], ids, [reference.logits(x) for x in ids], [g for g, _ in greedy], [m for _, m in greedy])
    report = compare("int8", "test", other, ref, Tolerance(1e-1))
    logits = torch.from_numpy(np.concatenate([other.logits(x) for x in ids]))
    _, kl, agree = _direct(logits, torch.from_numpy(np.concatenate(ref.logits)))
    assert report.top1_agreement == pytest.approx(agree) and report.kl_to_reference == pytest.approx(kl, rel=1e-5)
