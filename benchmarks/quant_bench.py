"""Int8 student and int8 teacher, side by side on the same held-out text.

    python benchmarks/quant_bench.py [--base outputs/quant_base] [--qat outputs/quant_qat] \
        [--int8-teacher-run outputs/quant_t8 --fp32-teacher-run outputs/quant_base50] [--blocks 32] [--threads 1]

Runs are run directories of ``recipe=distill`` (``--base`` defaults to outputs/distill when it has
a student, else outputs/quant_base); the held-out text is the base run's own validation split.

Student table: fp32 vs PTQ int8 (weight-only, dynamic) vs QAT int8 — perplexity, KL to the float
model (nats/token), top-1 agreement with it, decode tokens/s, prefill latency, weight bytes.
Teacher table: fp32 vs bitsandbytes int8 teacher — KL and agreement between the two, and the
students distilled from each, scored against the fp32 teacher. Writes the "Int8 quantization"
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from results import write_section

TARGETS = (
    "int8 bytes ≤ 0.3× fp32 · ppl ≤ +2% · top-1 agreement ≥ 97% · decode ≥ 2× fp32 · QAT recovers ≥ 50% of the PTQ gap"
)


MEASURABLE_GAP = 0.001
"""A PTQ perplexity gap under this fraction of the fp32 perplexity is run-to-run noise, not a gap QAT can close."""


def _run_dir(arg: str | None, *candidates: str) -> Path | None:
    for path in [arg, *candidates] if arg is None else [arg]:
        if path and (Path(path) / "student" / "config.json").is_file():
            return Path(path)
    if arg is not None:
        sys.exit(f"{arg}: no student/ in this run directory")
    return None


def _run_cfg(run: Path):
    from autoglm_train.eval.heldout_text import run_config

    return run_config(run)


def _load_student(run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(run / "student")


def _held_out(run: Path, tokenizer, blocks: int) -> list[dict]:
    from autoglm_train.eval.heldout_text import val_batches

    return val_batches(run, tokenizer, blocks)


def _quantized(model, **spec):
    from autoglm_train.quant.ptq import PTQSpec, quantize_model

    out = copy.deepcopy(model)
    quantize_model(out, PTQSpec(**spec))
    return out


# --- tables ---------------------------------------------------------------------------------------
def student_table(base_run: Path, qat_run: Path | None, batches, args) -> tuple[list[str], dict]:
    from autoglm_train.eval.speed import speeds
    from autoglm_train.quant.compare import compare_to_reference
    from autoglm_train.quant.qat import QATSpec
    from autoglm_train.quant.size import weight_bytes

    base, tokenizer = _load_student(base_run)
    vocab = len(tokenizer)
    qat_scheme = "int8_dynamic"
    if qat_run is not None:
        qat_cfg = _run_cfg(qat_run).quant.get("qat")
        qat_scheme = QATSpec(scheme=qat_cfg.scheme).scheme if qat_cfg else qat_scheme
    rows = {
        "fp32": (base, None),
        "bf16 weights (reference point)": (copy.deepcopy(base).to(torch.bfloat16), "fp32"),
        "PTQ int8 weight-only · torchao": (_quantized(base, scheme="int8_weight_only"), "fp32"),
        "PTQ int8 weight-only · int8pack kernel (bf16 act.)": (
            _quantized(base, scheme="int8_weight_only", kernel="int8pack"),
            "fp32",
        ),
        "PTQ int8 weight-only · vocab left fp32": (_quantized(base, scheme="int8_weight_only", head=False), "fp32"),
        "PTQ int8 dynamic · torchao": (_quantized(base, scheme="int8_dynamic"), "fp32"),
    }
    if qat_run is not None:
        qat, _ = _load_student(qat_run)
        rows["QAT student · fp32 weights"] = (qat, "fp32")
        rows[f"QAT → int8 {qat_scheme.removeprefix('int8_').replace('_', '-')} · torchao"] = (
            _quantized(qat, scheme=qat_scheme),
            "QAT student · fp32 weights",
        )
        rows["QAT → int8 weight-only · int8pack kernel (bf16 act.)"] = (
            _quantized(qat, scheme="int8_weight_only", kernel="int8pack"),
            "QAT student · fp32 weights",
        )
    scores = {}
    for ref_name in ["fp32", *([r for r in rows if r.startswith("QAT student")])]:
        ref = rows[ref_name][0]
        others = {n: m for n, (m, r) in rows.items() if r == ref_name}
        got = compare_to_reference(ref, others, batches, vocab)
        scores.update({n: s for n, s in got.items() if n != "reference"})
        if ref_name == "fp32":
            scores["fp32"] = got["reference"]
    block = batches[0]["input_ids"][:1]
    models = {n: m for n, (m, _) in rows.items()}
    speed = speeds(models, block[:, :16], block, args.new_tokens, args.repeats, tokenizer.pad_token_id)
    fp32_bytes, fp32_ppl, fp32_tps = weight_bytes(base), scores["fp32"].ppl, speed["fp32"]["decode_tps"]

    lines = [
        "| model | ppl | Δppl vs fp32 | KL to float (nats/tok) | top-1 agree w/ float | decode tok/s | "
        "decode × | prefill ms | weights MB | × fp32 bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    result = {}
    for name, (model, _) in rows.items():
        s, sp, nbytes = scores[name], speed[name], weight_bytes(model)
        result[name] = {**s.to_dict(), **sp, "weight_bytes": nbytes}
        lines.append(
            f"| {name} | {s.ppl:.2f} | {100 * (s.ppl / fp32_ppl - 1):+.2f}% | {s.kl_to_ref:.5f} | "
            f"{100 * s.top1_agreement:.2f}% | {sp['decode_tps']:.1f} | {sp['decode_tps'] / fp32_tps:.2f}× | "
            f"{sp['prefill_ms']:.1f} | {nbytes / 1e6:.2f} | {nbytes / fp32_bytes:.3f} |"
        )
    lines += ["", *(_verdicts(result, qat_run is not None, qat_scheme)), ""]
    lines.append(
        f"Held-out: {scores['fp32'].tokens} tokens of `{base_run}`'s validation split; decode = greedy "
        f"{args.new_tokens} new tokens after a 16-token prompt (`generate`, KV cache, batch 1); prefill = one "
        f"{block.shape[1]}-token prompt to its first logits; best of {args.repeats}, models interleaved, "
        f"torch threads = {args.threads}. KL/agreement are against each row's own float model (fp32 student for "
        "PTQ rows, the QAT student's float weights for its int8 rows; the QAT float row itself against the fp32 "
        'student, a different training run). "vocab" = lm_head + tied input embedding.'
    )
    return lines, result


def _verdicts(r: dict, has_qat: bool, qat_scheme: str) -> list[str]:
    fp32 = r["fp32"]
    wo, dyn, packed = (
        r["PTQ int8 weight-only · torchao"],
        r["PTQ int8 dynamic · torchao"],
        r["PTQ int8 weight-only · int8pack kernel (bf16 act.)"],
    )
    vocab_fp32 = r["PTQ int8 weight-only · vocab left fp32"]
    out = [
        f"Targets ({TARGETS}):",
        f"- weight bytes: {wo['weight_bytes'] / fp32['weight_bytes']:.3f}× fp32 with the vocab in int8 "
        f"({vocab_fp32['weight_bytes'] / fp32['weight_bytes']:.3f}× with it left fp32)",
        f"- perplexity: weight-only {100 * (wo['ppl'] / fp32['ppl'] - 1):+.2f}%, dynamic "
        f"{100 * (dyn['ppl'] / fp32['ppl'] - 1):+.2f}%, int8pack {100 * (packed['ppl'] / fp32['ppl'] - 1):+.2f}%",
        f"- top-1 agreement: weight-only {100 * wo['top1_agreement']:.2f}%, dynamic "
        f"{100 * dyn['top1_agreement']:.2f}%, int8pack {100 * packed['top1_agreement']:.2f}%",
        f"- decode: int8pack {packed['decode_tps'] / fp32['decode_tps']:.2f}× fp32, torchao weight-only "
        f"{wo['decode_tps'] / fp32['decode_tps']:.2f}×, torchao dynamic {dyn['decode_tps'] / fp32['decode_tps']:.2f}×",
    ]
    if has_qat:
        ptq = r["PTQ int8 dynamic · torchao"] if qat_scheme == "int8_dynamic" else wo
        qat_name = next(n for n in r if n.startswith("QAT → int8") and "torchao" in n)
        qat_int8, qat_float = r[qat_name], r["QAT student · fp32 weights"]
        gap = ptq["ppl"] - fp32["ppl"]
        line = (
            f"- QAT ({qat_scheme}): PTQ gap {gap:+.3f} ppl ({100 * gap / fp32['ppl']:+.3f}%); QAT int8 vs the fp32 "
            f"student {qat_int8['ppl'] - fp32['ppl']:+.3f} ppl; QAT int8 vs its own float weights "
            f"{qat_int8['ppl'] - qat_float['ppl']:+.3f} ppl"
        )
        if gap > MEASURABLE_GAP * fp32["ppl"]:
            across = (ptq["ppl"] - qat_int8["ppl"]) / gap
            within = 1 - (qat_int8["ppl"] - qat_float["ppl"]) / gap
            line += f" → recovers {100 * across:.0f}% (across runs) / {100 * within:.0f}% (own float) of the gap"
        else:
            line += f" → the PTQ gap is below {100 * MEASURABLE_GAP:.1f}% of ppl: no gap to recover, not measurable"
        out.append(line)
    return out


def teacher_table(base_run: Path, fp32_run: Path, t8_run: Path | None, batches, args) -> tuple[list[str], dict]:
    from hydra.utils import instantiate

    from autoglm_train.distill.teacher import load_teacher
    from autoglm_train.quant.compare import compare_to_reference

    spec = instantiate(_run_cfg(base_run).teacher)
    fp32 = load_teacher(dataclasses.replace(spec, load_in_8bit=False))
    int8 = load_teacher(dataclasses.replace(spec, load_in_8bit=True))
    vocab = fp32.config.vocab_size
    students = {"student ← fp32 teacher": _load_student(fp32_run)[0]}
    if t8_run is not None:
        students["student ← int8 teacher"] = _load_student(t8_run)[0]
    scores = compare_to_reference(fp32, {"int8 teacher": int8, **students}, batches, vocab)
    ms = {}
    with torch.no_grad():
        x = batches[0]["input_ids"]
        for name, m in (("fp32", fp32), ("int8", int8)):
            runs = []
            for _ in range(2):
                start = time.perf_counter()
                m(input_ids=x)
                runs.append(time.perf_counter() - start)
            ms[name] = 1000 * min(runs)
    mem = {"fp32": fp32.get_memory_footprint(), "int8": int8.get_memory_footprint()}
    lines = [
        "| teacher | ppl | KL(fp32 ‖ ·) nats/tok | top-1 agree w/ fp32 | forward ms (batch) | memory MB |",
        "|---|---|---|---|---|---|",
        f"| fp32 | {scores['reference'].ppl:.2f} | 0 | 100% | {ms['fp32']:.0f} | {mem['fp32'] / 1e6:.0f} |",
        f"| int8 (bitsandbytes LLM.int8) | {scores['int8 teacher'].ppl:.2f} | {scores['int8 teacher'].kl_to_ref:.5f} | "
        f"{100 * scores['int8 teacher'].top1_agreement:.2f}% | {ms['int8']:.0f} | {mem['int8'] / 1e6:.0f} |",
        "",
        "| student (same recipe, KD from …) | ppl | KL(fp32 teacher ‖ student) | top-1 agree w/ fp32 teacher |",
        "|---|---|---|---|",
    ]
    for name in students:
        s = scores[name]
        lines.append(f"| {name} | {s.ppl:.2f} | {s.kl_to_ref:.4f} | {100 * s.top1_agreement:.2f}% |")
    lines.append("")
    lines.append(
        f"Same held-out tokens ({scores['reference'].tokens}); forward = one batch of {tuple(x.shape)} tokens, "
        f"best of 2; memory = `get_memory_footprint()`. Students: `{fp32_run}`"
        + (f" and `{t8_run}` (`quant=int8_teacher`, otherwise identical)." if t8_run else ".")
    )
    return lines, {n: s.to_dict() for n, s in scores.items()} | {"forward_ms": ms, "memory_bytes": mem}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="run dir of the float student (default: outputs/distill, else outputs/quant_base)")
    p.add_argument("--qat", help="run dir of the QAT student (default: outputs/quant_qat if present)")
    p.add_argument("--int8-teacher-run", help="run dir of a quant=int8_teacher student (default: outputs/quant_t8)")
    p.add_argument("--fp32-teacher-run", help="its twin distilled from the fp32 teacher, same steps (default: --base)")
    p.add_argument("--blocks", type=int, default=32, help="held-out blocks scored")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise on a shared machine)")
    p.add_argument("--no-teacher", action="store_true", help="skip the int8 teacher table")
    p.add_argument("--json", help="also write the raw numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base = _run_dir(args.base, "outputs/distill", "outputs/quant_base")
    if base is None:
        print("quant_bench: SKIPPED, no trained student; run: python train.py recipe=distill run_name=quant_base")
        return 0
    qat = _run_dir(args.qat, "outputs/quant_qat")
    t8 = _run_dir(args.int8_teacher_run, "outputs/quant_t8")
    _, tokenizer = _load_student(base)
    batches = _held_out(base, tokenizer, args.blocks)

    lines, raw = student_table(base, qat, batches, args)
    body = ["### Student: fp32 vs int8", "", *lines]
    if not args.no_teacher:
        twin = _run_dir(args.fp32_teacher_run) if args.fp32_teacher_run else base
        t_lines, t_raw = teacher_table(base, twin, t8, batches, args)
        body += ["", "### Teacher: fp32 vs int8, and its effect on distillation", "", *t_lines]
        raw = {"student": raw, "teacher": t_raw}
    text = "\n".join(body)
    print(text)
    write_section("Int8 quantization", text, script="quant_bench.py " + " ".join(itertools.chain(sys.argv[1:])))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
