"""Chunked KD losses equal a naive full-logits reference, and never build B×T×V logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_train.distill.divergences import KD_KINDS, TOPK_KINDS, divergence, topk_divergence
from autoglm_train.distill.kd_loss import KDLoss
from autoglm_train.distill.teacher_agreement import teacher_agreement_and_kl

B, T, HS, HT, V = 2, 7, 16, 12, 50
V_STUDENT = V + 4  # reserved rows the KD term must ignore
V_TEACHER = V + 6  # padded rows the KD term must ignore
TOL = {"atol": 1e-5, "rtol": 1e-5}
LOSS_DIR = Path(__file__).resolve().parents[1] / "conf" / "loss"


def make_case(t: int = T, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student_head = nn.Linear(HS, V_STUDENT, bias=False)
    teacher_head = nn.Linear(HT, V_TEACHER, bias=False)
    labels = torch.randint(0, V_STUDENT, (B, t), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return {
        "student_hidden": torch.randn(B, t, HS, generator=g, requires_grad=True),
        "student_head": student_head,
        "teacher_hidden": torch.randn(B, t, HT, generator=g),
        "teacher_head": teacher_head.requires_grad_(False),
        "labels": labels,
    }


def reference_loss(kind: str, tau: float, kd_ratio: float, case: dict, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """Naive: full [B, T, V] logits, divergences written in probability space."""
    s_logits = case["student_head"](case["student_hidden"])
    t_logits = case["teacher_head"](case["teacher_hidden"]).detach()
    mask = case["labels"] != -100
    ce = F.cross_entropy(s_logits.reshape(-1, V_STUDENT), case["labels"].reshape(-1), ignore_index=-100)
    p = torch.softmax(t_logits[..., :V] / tau, -1)
    q = torch.softmax(s_logits[..., :V] / tau, -1)
    if kind == "forward_kl":
        d = (p * (p / q).log()).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (q / p).log()).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    elif kind == "skew_kl":
        d = (p * (p / (alpha * p + (1 - alpha) * q)).log()).sum(-1)
    elif kind == "skew_reverse_kl":
        d = (q * (q / (alpha * q + (1 - alpha) * p)).log()).sum(-1)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    kd = d[mask].mean() * tau**2
    return kd_ratio * kd + (1 - kd_ratio) * ce


def grads(loss: Tensor, case: dict) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, (case["student_hidden"], case["student_head"].weight))


def chunked(loss_fn: KDLoss, case: dict, **kw):
    return loss_fn(
        case["student_hidden"],
        case["student_head"],
        case["labels"],
        teacher_hidden=kw.pop("teacher_hidden", case["teacher_hidden"]),
        teacher_head=kw.pop("teacher_head", case["teacher_head"]),
        vocab_size=V,
        **kw,
    )


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_matches_reference(kind: str, tau: float, kd_ratio: float) -> None:
    case = make_case()
    out = chunked(KDLoss(kind=kind, temperature=tau, kd_ratio=kd_ratio, chunk_size=3), case)
    ref = reference_loss(kind, tau, kd_ratio, case)
    assert out.num_tokens == int((case["labels"] != -100).sum()) == 11  # 11 % 3 != 0
    torch.testing.assert_close(out.loss, ref, **TOL)
    for got, want in zip(grads(out.loss, case), grads(ref, case), strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_identical_distributions_have_zero_divergence(kind: str) -> None:
    logp = torch.randn(5, V).log_softmax(-1)
    torch.testing.assert_close(divergence(kind, logp, logp), torch.zeros(5), atol=1e-6, rtol=0)
    case = make_case()
    same = chunked(
        KDLoss(kind=kind, chunk_size=4), case, teacher_hidden=case["student_hidden"], teacher_head=case["student_head"]
    )
    torch.testing.assert_close(same.kd_loss, torch.zeros(()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_topk_identical_is_zero(kind: str) -> None:
    logp = torch.randn(5, V).log_softmax(-1)
    top, ids = logp.topk(V, -1)
    torch.testing.assert_close(topk_divergence(kind, top, logp, ids), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kind", "kl"),
        ("temperature", 0.0),
        ("beta", 0.0),
        ("beta", 1.0),
        ("skew_alpha", 1.0),
        ("skew_alpha", -0.1),
        ("kd_ratio", 1.5),
        ("kd_ratio", -0.5),
        ("chunk_size", 0),
        ("chunk_size", 2.5),
    ],
)
def test_invalid_config_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"loss\.{key}="):
        KDLoss(**{key: value})


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_topk_with_k_equal_vocab_matches_full(kind: str, tau: float) -> None:
    case = make_case()
    loss_fn = KDLoss(kind=kind, temperature=tau, kd_ratio=0.7, chunk_size=3)
    full = chunked(loss_fn, case)
    t_logp = case["teacher_head"](case["teacher_hidden"])[..., :V].log_softmax(-1)
    topk = chunked(loss_fn, case, teacher_hidden=None, teacher_head=None, teacher_topk=t_logp.topk(V, -1))
    torch.testing.assert_close(topk.loss, full.loss, **TOL)
    for got, want in zip(grads(topk.loss, case), grads(full.loss, case), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_topk_forward_kl_uses_renormalised_teacher() -> None:
    case = make_case()
    k = 5
    t_logp = case["teacher_head"](case["teacher_hidden"])[..., :V].log_softmax(-1)
    top, ids = t_logp.topk(k, -1)
    out = chunked(
        KDLoss(kind="forward_kl", kd_ratio=1.0, chunk_size=4),
        case,
        teacher_hidden=None,
        teacher_head=None,
        teacher_topk=(top, ids),
    )
    p = top.exp() / top.exp().sum(-1, keepdim=True)
    q = case["student_head"](case["student_hidden"])[..., :V].softmax(-1).gather(-1, ids)
    ref = (p * (p / q).log()).sum(-1)[case["labels"] != -100].mean()
    torch.testing.assert_close(out.loss, ref, **TOL)


def test_topk_unsupported_kind_raises() -> None:
    case = make_case()
    topk = torch.randn(B, T, 4).log_softmax(-1), torch.randint(0, V, (B, T, 4))
    with pytest.raises(NotImplementedError, match="jsd"):
        chunked(KDLoss(kind="jsd"), case, teacher_hidden=None, teacher_head=None, teacher_topk=topk)


def test_ce_only_without_teacher() -> None:
    case = make_case()
    out = chunked(KDLoss(kd_ratio=0.0, chunk_size=5), case, teacher_hidden=None, teacher_head=None)
    logits = case["student_head"](case["student_hidden"]).reshape(-1, V_STUDENT)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, case["labels"].reshape(-1)), **TOL)
    with pytest.raises(ValueError, match=r"loss\.kd_ratio=0\.5 > 0 needs a teacher"):
        chunked(KDLoss(kd_ratio=0.5), case, teacher_hidden=None, teacher_head=None)


def test_all_positions_ignored_gives_zero_and_backprops() -> None:
    case = make_case()
    case["labels"].fill_(-100)
    out = chunked(KDLoss(), case)
    assert out.num_tokens == 0
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert case["student_head"].weight.grad is not None


def test_half_precision_head_gives_float32_loss() -> None:
    case = make_case()
    case["student_head"].to(torch.bfloat16)
    case["student_hidden"] = case["student_hidden"].detach().bfloat16().requires_grad_()
    out = chunked(KDLoss(kind="jsd", chunk_size=4), case)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(case["student_hidden"].grad.float()).all()


def test_no_full_logits_are_saved_for_backward() -> None:
    """Every tensor autograd keeps must be far smaller than B×T×V; the naive path must not be."""
    case = make_case(t=64)
    full = B * 64 * V

    def max_saved_numel(fn) -> int:
        sizes = [0]

        def pack(x: Tensor) -> Tensor:
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
            loss.backward()
        return max(sizes)

    chunked_max = max_saved_numel(lambda: chunked(KDLoss(kind="jsd", chunk_size=8), case).loss)
    naive_max = max_saved_numel(lambda: reference_loss("jsd", 1.0, 0.5, case))
    assert naive_max >= full  # the probe does see full logits when they are kept
    assert chunked_max < full // 4


def test_no_full_logits_are_ever_created() -> None:
    """Stronger than the saved-tensor check: watch every vocab-wide op output, forward and backward.

    Only tensors whose last dim is a vocab width count: the B×T×H hidden-state gradient is
    legitimately full-size.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, tuple | list) else (out,):
                if isinstance(o, Tensor) and o.dim() and o.shape[-1] >= V:
                    self.max = max(self.max, o.numel())
            return out

    case = make_case(t=64)
    with MaxNumel() as probe:
        chunked(KDLoss(kind="skew_kl", chunk_size=8), case).loss.backward()
    assert probe.max < B * 64 * V // 4
    with MaxNumel() as naive:
        reference_loss("skew_kl", 1.0, 0.5, case).backward()
    assert naive.max >= B * 64 * V


def test_teacher_agreement_and_kl() -> None:
    case = make_case()
    args = (case["student_hidden"], case["student_head"], case["teacher_hidden"], case["teacher_head"])
    agree, kl = teacher_agreement_and_kl(*args, case["labels"], vocab_size=V, chunk_size=3)
    mask = case["labels"] != -100
    s = case["student_head"](case["student_hidden"])[..., :V][mask]
    t = case["teacher_head"](case["teacher_hidden"])[..., :V][mask]
    torch.testing.assert_close(agree, (s.argmax(-1) == t.argmax(-1)).float().mean())
    p, q = t.softmax(-1), s.softmax(-1)
    torch.testing.assert_close(kl, (p * (p / q).log()).sum(-1).mean(), **TOL)
    same = teacher_agreement_and_kl(*args[:2], *args[:2], case["labels"], vocab_size=V, chunk_size=3)
    assert same[0].item() == 1.0 and abs(same[1].item()) < 1e-6


def test_every_loss_config_instantiates() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    files = sorted(LOSS_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(KD_KINDS)
    for f in files:
        assert f.read_text().startswith("# ")
        loss_fn = instantiate(OmegaConf.load(f))
        assert isinstance(loss_fn, KDLoss) and loss_fn.kind == f.stem
        assert (loss_fn.temperature, loss_fn.kd_ratio, loss_fn.chunk_size) == (1.0, 0.5, 256)


class _WrappedHead(nn.Module):
    """A head that is not a plain ``nn.Linear`` (like a fake-quant head): takes the recompute-in-backward path."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_fused_and_recompute_paths_agree(kind: str) -> None:
    case = make_case()
    loss_fn = KDLoss(kind=kind, temperature=2.0, kd_ratio=0.7, chunk_size=4)
    fused = chunked(loss_fn, case)
    recompute = chunked(loss_fn, {**case, "student_head": _WrappedHead(case["student_head"])})
    torch.testing.assert_close(fused.loss, recompute.loss, **TOL)
    torch.testing.assert_close(fused.kd_loss, recompute.kd_loss, **TOL)
    for got, want in zip(grads(fused.loss, case), grads(recompute.loss, case), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_fused_forward_kl_value_holds_at_a_real_vocabulary() -> None:
    """At 256 positions × 49,152 columns (SmolLM2's vocabulary; a ZeRO-3 head takes the recompute path) the fused
    forward-KL value equals the recompute path's and a float64 reference: an fp32 BLAS dot over the chunk was 3e-4
    off on the loss and made ZeRO-3 and DDP runs disagree."""
    gen = torch.Generator().manual_seed(0)
    vocab, n, hs, ht = 49_152, 256, 32, 48
    student, teacher = nn.Linear(hs, vocab + 8, bias=False), nn.Linear(ht, vocab, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.randn(student.weight.shape, generator=gen) * 0.5)
        teacher.weight.copy_(torch.randn(teacher.weight.shape, generator=gen) * 1.5)
    h, t = torch.randn(1, n, hs, generator=gen), torch.randn(1, n, ht, generator=gen)
    y = torch.randint(0, vocab, (1, n), generator=gen)
    loss_fn = KDLoss(kd_ratio=1.0, chunk_size=n)
    with torch.no_grad():
        fused = loss_fn(h, student, y, t, teacher, vocab_size=vocab)
        recompute = loss_fn(h, _WrappedHead(student), y, t, teacher, vocab_size=vocab)
        t_logp = torch.log_softmax(t[0].double() @ teacher.weight.double().T, -1)
        s_logp = torch.log_softmax((h[0].double() @ student.weight.double().T)[:, :vocab], -1)
        want = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    assert abs(fused.kd_loss.item() - recompute.kd_loss.item()) < 1e-5
    assert abs(fused.kd_loss.item() - want.item()) < 1e-5


def test_fused_path_runs_each_head_once_per_chunk_and_never_differentiates_the_teacher() -> None:
    case = make_case()
    case["teacher_head"].requires_grad_(True)  # even a teacher head that could take gradients gets none
    calls = {"teacher": 0}
    case["teacher_head"].register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
    out = chunked(KDLoss(kind="jsd", chunk_size=3), case)
    assert calls["teacher"] == 4  # 11 positions in chunks of 3; nothing recomputed in backward
    out.loss.backward()
    assert calls["teacher"] == 4 and case["teacher_head"].weight.grad is None
    assert case["student_head"].weight.grad is not None and not out.kd_loss.requires_grad


def test_fused_path_with_bias_and_without_grad() -> None:
    case = make_case()
    head = nn.Linear(HS, V_STUDENT, bias=True)
    case["student_head"] = head
    out = chunked(KDLoss(kind="reverse_kl", chunk_size=5), case)
    ref = reference_loss("reverse_kl", 1.0, 0.5, case)
    torch.testing.assert_close(out.loss, ref, **TOL)
    got = torch.autograd.grad(out.loss, (case["student_hidden"], head.weight, head.bias))
    want = torch.autograd.grad(ref, (case["student_hidden"], head.weight, head.bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(chunked(KDLoss(kind="reverse_kl", chunk_size=5), case).loss, ref.detach(), **TOL)


def test_fused_forward_kl_takes_a_teacher_logit_of_minus_inf_as_zero_probability() -> None:
    """A masked teacher column (logit −inf, p = 0) adds nothing to KL(p‖q) and makes nothing nan, value or gradient."""
    case = make_case()
    masked = [3, 17, V - 1]

    def teacher_head(h: Tensor) -> Tensor:
        logits = case["teacher_head"](h)
        logits[..., masked] = float("-inf")
        return logits

    loss_fn = KDLoss(kind="forward_kl", kd_ratio=0.5, chunk_size=4)
    got = chunked(loss_fn, case, teacher_head=teacher_head)
    mask = case["labels"] != -100
    s_logits = case["student_head"](case["student_hidden"])
    p = torch.softmax(teacher_head(case["teacher_hidden"]).detach()[..., :V], -1)
    logq = torch.log_softmax(s_logits[..., :V], -1)
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)[mask].mean()
    ce = F.cross_entropy(s_logits.reshape(-1, V_STUDENT), case["labels"].reshape(-1), ignore_index=-100)
    want = 0.5 * kl + 0.5 * ce
    torch.testing.assert_close(got.loss, want, **TOL)
    for g, w in zip(grads(got.loss, case), grads(want, case), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **TOL)


def test_fused_loss_reuses_its_chunk_buffers_and_stays_exact_when_shapes_change() -> None:
    """The per-chunk logits live in buffers kept across chunks and calls (CPU page faults, chunk_buffers.py); reuse
    never leaks one chunk's or one call's values into the next, and a wider head gets fresh, right-sized buffers."""
    loss_fn = KDLoss(kind="forward_kl", kd_ratio=0.5, chunk_size=4)
    case = make_case()
    first = chunked(loss_fn, case)
    first_grads = grads(first.loss, case)
    kept = {name: buf.data_ptr() for name, buf in loss_fn.buffers._kept.items()}
    assert set(kept) == {"student_logits", "teacher_logits", "student_exp", "teacher_exp"}

    other = make_case(seed=1)  # different values, same shapes: the same memory, this call's result
    got = chunked(loss_fn, other)
    want = reference_loss("forward_kl", 1.0, 0.5, other)
    torch.testing.assert_close(got.loss, want, **TOL)
    for g, w in zip(grads(got.loss, other), grads(want, other), strict=True):
        torch.testing.assert_close(g, w, **TOL)
    assert {name: buf.data_ptr() for name, buf in loss_fn.buffers._kept.items()} == kept

    again = chunked(loss_fn, case)  # back to the first inputs: bit-identical to the first call
    assert torch.equal(again.loss, first.loss)
    for g, w in zip(grads(again.loss, case), first_grads, strict=True):
        assert torch.equal(g, w)

    wide = make_case()
    wide["student_head"] = nn.Linear(HS, V_STUDENT + 8, bias=False)
    got = chunked(loss_fn, wide)
    s_logits = wide["student_head"](wide["student_hidden"])
    mask = wide["labels"] != -100
    p = torch.softmax(wide["teacher_head"](wide["teacher_hidden"])[..., :V], -1)
    kl = (p * (p.log() - torch.log_softmax(s_logits[..., :V], -1))).sum(-1)[mask].mean()
    ce = F.cross_entropy(s_logits.reshape(-1, V_STUDENT + 8), wide["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got.loss, 0.5 * kl + 0.5 * ce, **TOL)
    assert loss_fn.buffers._kept["student_logits"].shape == (4, V_STUDENT + 8)


def test_chunk_logits_under_autocast_are_the_autocast_product() -> None:
    """Under mixed precision the head runs as autocast runs it (bf16 here), not as a float32 ``out=`` product."""
    from autoglm_train.distill.chunk_buffers import ChunkBuffers

    torch.manual_seed(0)
    h, w = torch.randn(5, 64), torch.randn(300, 64)
    buffers = ChunkBuffers()
    exact = buffers.logits("x", h, w)
    torch.testing.assert_close(exact, h @ w.t())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = buffers.logits("x", h, w)
        want = F.linear(h, w).float()
    assert mixed.dtype == torch.float32 and torch.equal(mixed, want)
    assert not torch.equal(mixed, exact)  # bf16 rounding shows: it really ran in bf16


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])  # the fused forward KL reads the head's weight; jsd calls it
def test_a_teacher_head_narrower_than_vocab_size_is_refused_by_name(kind: str) -> None:
    case = make_case()
    case["teacher_head"] = nn.Linear(HT, V - 1, bias=False).requires_grad_(False)
    with pytest.raises(ValueError, match=f"teacher head gives {V - 1} logits, fewer than vocab_size={V}"):
        chunked(KDLoss(kind=kind, chunk_size=4), case)
