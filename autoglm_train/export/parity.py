"""Parity of every exported form with the training model, through each form's real consumer.

For a fixed set of prompts the reference (the fp32 decoder training wrote) and a form are
compared on (a) logits at every prompt position, teacher-forced (max difference; top-1 agreement and KL
through :func:`~autoglm_train.model.next_token_metrics.next_token_sums`, the metric validation and the
int8 comparison use), and (b) greedy continuations.
Each runtime is driven the way a user drives it: transformers models with their KV cache,
llama-cpp-python token by token, onnxruntime re-running the whole sequence.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from autoglm_train.model.next_token_metrics import next_token_sums

PROMPTS: tuple[str, ...] = (
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
)
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 8


@dataclass(frozen=True)
class Tolerance:
    """What a form must meet against the fp32 reference, with ``scale`` = the reference's max |logit|.

    1. max |Δlogit| over every prompt position and the whole vocabulary <= ``rtol · scale``;
    2. top-1 and greedy tokens identical to the reference's wherever the reference's own top-2 margin
       exceeds the noise band ``2 · rtol · scale``. A greedy divergence at a step inside the band (a tie
       within the form's allowed error) ends that comparison instead of failing it.

    Scaling by the reference's logits makes a bound mean the same for a micro model and a 9B one.
    """

    rtol: float

    def band(self, scale: float) -> float:
        return 2 * self.rtol * scale

    def describe(self) -> str:
        return (
            f"max|Δlogit| <= {self.rtol:g}·max|ref|; top-1/greedy identical where the reference margin "
            f"> {2 * self.rtol:g}·max|ref|"
        )


# Float forms only round: fp32 graphs differ in summation order (~1e-6 relative); fp16 keeps 11 significant
# bits and bf16 8, compounded over the layers; llama.cpp's f16 path also rounds activations to fp16.
# 8-bit forms add a weight error of up to 1/254 of each row's (int8) or 32-block's (q8_0) max |w|, so their
# band is wider: flips are allowed only between candidates that were within that band in the reference.
TOLERANCES: dict[str, Tolerance] = {
    "hf:float32": Tolerance(1e-4),
    "hf:float16": Tolerance(1e-2),
    "hf:bfloat16": Tolerance(5e-2),
    "onnx": Tolerance(1e-4),
    "gguf_f16": Tolerance(1e-2),
    "gguf_q8_0": Tolerance(1e-1),
    "int8": Tolerance(1e-1),
}


def tolerances(overrides: dict[str, float] | None = None) -> dict[str, Tolerance]:
    """:data:`TOLERANCES` with some ``rtol`` values replaced, e.g. ``{"hf:bfloat16": 0.08}`` for a deep model."""
    table = dict(TOLERANCES)
    for key, rtol in (overrides or {}).items():
        if key not in table:
            raise ValueError(f"unknown tolerance key {key!r}; known: {sorted(table)}")
        if not rtol > 0:
            raise ValueError(f"tolerance {key}={rtol}: must be > 0")
        table[key] = Tolerance(float(rtol))
    return table


class Runner(Protocol):
    """One loaded form: logits for a token sequence, and a greedy continuation."""

    def logits(self, ids: Sequence[int]) -> np.ndarray: ...

    def greedy(self, ids: Sequence[int], n: int) -> list[int]: ...


class TorchRunner:
    """A transformers causal LM (fp32/fp16/bf16 HF, or the int8 form's dequantized model)."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        # transformers 5.x renamed the KV-cache argument/output from past_key_values to cache.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        return self.greedy_with_margins(ids, n)[0]

    @torch.no_grad()
    def greedy_with_margins(self, ids: Sequence[int], n: int) -> tuple[list[int], list[float]]:
        """Greedy tokens (KV cache on) and, per step, the gap between the best and second-best logit."""
        out = self.model(input_ids=torch.tensor([list(ids)]), use_cache=True)
        tokens, margins = [], []
        for _ in range(n):
            top2 = out.logits[0, -1].float().topk(2).values
            tokens.append(int(out.logits[0, -1].argmax()))
            margins.append(float(top2[0] - top2[1]))
            cache = getattr(out, self._cache_arg)
            out = self.model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{self._cache_arg: cache})
        return tokens, margins


class OnnxRunner:
    """An onnxruntime session over ``onnx/model.onnx`` (no KV cache: full sequence each step)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.session.run(None, {"input_ids": np.asarray([list(ids)], dtype=np.int64)})[0][0]

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        seq, tokens = list(ids), []
        for _ in range(n):
            tokens.append(int(self.logits(seq)[-1].argmax()))
            seq.append(tokens[-1])
        return tokens


class LlamaCppRunner:
    """llama-cpp-python over a GGUF file, fed token ids (its KV cache used for the greedy steps)."""

    def __init__(self, path: Path, n_ctx: int = 512) -> None:
        from llama_cpp import Llama

        # Half the cores for prompt batches too (llama-cpp-python's default uses all of them for batches,
        # which stalls badly when the machine is shared).
        threads = max(1, (os.cpu_count() or 2) // 2)
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            seed=0,
            n_threads=threads,
            n_threads_batch=threads,
        )

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(ids))
        tokens = []
        for _ in range(n):
            tokens.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([tokens[-1]])
        return tokens

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


@dataclass
class Reference:
    """The training model's answers on the fixed prompts."""

    texts: list[str]
    ids: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[list[int]]
    greedy_margins: list[list[float]]

    @property
    def scale(self) -> float:
        return max(float(np.abs(x).max()) for x in self.logits)


@dataclass
class FormReport:
    """One form's parity numbers and verdict."""

    form: str
    consumer: str
    requirement: str
    max_abs_logit_diff: float = float("nan")
    max_rel_logit_diff: float = float("nan")
    top1_agreement: float = float("nan")
    """Raw share of prompt positions whose argmax agrees (ties included)."""
    decisive_top1_agreement: float = float("nan")
    """The same over positions where the reference's top-2 margin exceeds the form's noise band (required 100%)."""
    kl_to_reference: float = float("nan")
    """Mean KL(p_ref ‖ p_form) in nats per prompt position (informative; no bound)."""
    greedy_agreement: float = float("nan")
    """Raw share of greedy tokens equal to the reference's, position by position."""
    greedy_identical: bool = False
    greedy_identical_per_prompt: list[bool] = field(default_factory=list)
    passed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_texts(tokenizer) -> list[str]:
    """The fixed prompts: plain texts plus one chat turn rendered with thinking off."""
    chat = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return [*PROMPTS, chat]


def reference_answers(model, tokenizer, texts: Sequence[str] | None = None, n_new: int = NEW_TOKENS) -> Reference:
    texts = list(texts or prompt_texts(tokenizer))
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    runner = TorchRunner(model)
    greedy = [runner.greedy_with_margins(x, n_new) for x in ids]
    return Reference(texts, ids, [runner.logits(x) for x in ids], [g for g, _ in greedy], [m for _, m in greedy])


def _margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def compare(form: str, consumer: str, runner: Runner, ref: Reference, tol: Tolerance) -> FormReport:
    """Run ``runner`` on the reference prompts and judge it against ``tol`` (see :class:`Tolerance`)."""
    report = FormReport(form, consumer, tol.describe())
    band = tol.band(ref.scale)
    max_abs, kl, agree, total, dec_agree, dec_total, g_agree, g_total = 0.0, 0.0, 0, 0, 0, 0, 0, 0
    greedy_ok = True
    for ids, ref_logits, ref_greedy, ref_margins in zip(
        ref.ids, ref.logits, ref.greedy, ref.greedy_margins, strict=True
    ):
        logits = runner.logits(ids)
        if logits.shape != ref_logits.shape:
            report.notes.append(f"logits shape {logits.shape} != reference {ref_logits.shape}")
            return report
        max_abs = max(max_abs, float(np.abs(logits - ref_logits).max()))
        sums = next_token_sums(torch.from_numpy(logits), reference=torch.from_numpy(ref_logits))
        kl, agree, total = kl + float(sums["kl"]), agree + int(sums["agree"]), total + len(ids)
        decisive = _margins(ref_logits) > band
        sure = next_token_sums(torch.from_numpy(logits[decisive]), reference=torch.from_numpy(ref_logits[decisive]))
        dec_agree, dec_total = dec_agree + int(sure["agree"]), dec_total + int(decisive.sum())
        tokens = runner.greedy(ids, len(ref_greedy))
        g_agree += sum(a == b for a, b in zip(tokens, ref_greedy, strict=True))
        g_total += len(ref_greedy)
        report.greedy_identical_per_prompt.append(tokens == ref_greedy)
        for step, (a, b, margin) in enumerate(zip(tokens, ref_greedy, ref_margins, strict=True)):
            if a != b:
                tie = margin <= band
                greedy_ok &= tie
                report.notes.append(
                    f"greedy diverges at step {step} of a {len(ids)}-token prompt ({a} vs {b}); reference margin "
                    f"{margin:.3g} {'<=' if tie else '>'} band {band:.3g}" + (" (a tie: allowed)" if tie else "")
                )
                break
    report.max_abs_logit_diff = max_abs
    report.max_rel_logit_diff = max_abs / max(ref.scale, 1e-12)
    report.top1_agreement = agree / total
    report.kl_to_reference = kl / total
    report.decisive_top1_agreement = dec_agree / dec_total if dec_total else 1.0
    report.greedy_agreement = g_agree / g_total
    report.greedy_identical = g_agree == g_total
    report.passed = report.max_rel_logit_diff <= tol.rtol and report.decisive_top1_agreement == 1.0 and greedy_ok
    return report
