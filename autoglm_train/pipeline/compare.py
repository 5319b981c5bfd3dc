"""Teacher vs distilled student vs its int8 form, on the distill run's own held-out text.

    python -m autoglm_train.pipeline.compare --run outputs/demo/distill --out outputs/demo/eval/compare.json

Perplexity, KL(teacher ‖ model) and top-1 agreement with the teacher (``quant.compare``), weight
bytes (``quant.size``) and decode tokens/s + prefill latency (``eval.speed``): the functions
``benchmarks/quant_bench.py`` uses, so the numbers mean the same. The int8 model is the run's
``student_int8/`` loaded from disk (with the kernel of the run's PTQ spec): the file the export ships.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def compare(run: Path, blocks: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (``models.<name>.*`` per model)."""
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoglm_train.distill.teacher import load_teacher, load_teacher_tokenizer
    from autoglm_train.eval.heldout_text import run_config, val_batches
    from autoglm_train.eval.speed import speeds
    from autoglm_train.model.decoder import count_parameters
    from autoglm_train.quant.compare import compare_to_reference
    from autoglm_train.quant.int8_layout import PTQ_DIR, load_int8
    from autoglm_train.quant.ptq import PTQSpec
    from autoglm_train.quant.size import weight_bytes

    cfg = run_config(run)
    spec = instantiate(cfg.teacher)
    teacher = load_teacher(spec)
    kd_vocab = len(load_teacher_tokenizer(spec))  # the teacher's real vocabulary, as KD compared it
    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    ptq = (cfg.get("quant") or {}).get("ptq")
    ptq_spec = instantiate(ptq) if ptq else PTQSpec()
    int8 = load_int8(run / PTQ_DIR, kernel=ptq_spec.kernel)  # the file the run measured and the export ships
    models = {"teacher": teacher, "student": student, "student_int8": int8}

    batches = val_batches(run, tokenizer, blocks)
    to_teacher = compare_to_reference(teacher, {"student": student, "student_int8": int8}, batches, kd_vocab)
    to_student = compare_to_reference(student, {"student_int8": int8}, batches, kd_vocab)["student_int8"]
    first = batches[0]["input_ids"][:1]
    speed = speeds(models, first[:, :16], first, new_tokens, repeats, tokenizer.pad_token_id)
    out_models = {}
    for name, model in models.items():
        score = to_teacher["reference" if name == "teacher" else name]
        out_models[name] = {
            "params": count_parameters(model),
            "weight_bytes": weight_bytes(model),
            "ppl": score.ppl,
            "kl_to_teacher": score.kl_to_ref,
            "top1_agreement_with_teacher": score.top1_agreement,
            **speed[name],
        }
    return {
        "run": str(run),
        "teacher": cfg.teacher.path,
        "int8_scheme": ptq_spec.scheme,
        "held_out": {
            "split": "val",
            "blocks": sum(len(b["input_ids"]) for b in batches),
            "seq_len": int(first.shape[1]),
            "tokens": to_teacher["reference"].tokens,
        },
        "speed": {
            "new_tokens": new_tokens,
            "prompt_tokens": min(16, int(first.shape[1])),
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        },
        "models": out_models,
        "int8_vs_student": {"kl": to_student.kl_to_ref, "top1_agreement": to_student.top1_agreement},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m autoglm_train.pipeline.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a recipe=distill run directory")
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    p.add_argument("--blocks", type=int, default=32, help="held-out blocks scored")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decode-speed measurement")
    p.add_argument("--repeats", type=int, default=3, help="speed measurements per model (best counts)")
    args = p.parse_args(argv)
    result = compare(args.run, args.blocks, args.new_tokens, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    for name, m in result["models"].items():
        print(
            f"{name:<13} ppl {m['ppl']:10.2f}  KL {m['kl_to_teacher']:.4f}  "
            f"agree {m['top1_agreement_with_teacher']:.3f}"
            f"  {m['weight_bytes'] / 1e6:7.1f} MB  {m['decode_tps']:6.1f} tok/s"
        )


if __name__ == "__main__":
    main()
