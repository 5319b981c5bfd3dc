"""The plan as a Markdown report, and ``python -m autoglm_train.plan``'s command line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from autoglm_train.plan.memory import GB, OVERHEAD_BYTES, STRATEGIES, _deepspeed_estimators, plan_rows, recommend
from autoglm_train.plan.shapes import Shape, plugin_params, student_shape, teacher_shape

CHECKPOINTING_OVERRIDE = " '+callbacks=[{_target_: autoglm_train.tasks.recompute.ActivationCheckpointing}]'"
_OFFLOAD = "trainer.strategy.offload_optimizer=true optim=deepspeed_cpu_adam"
TRAINER_CONFIG = {
    "ddp": "trainer=ddp",
    "deepspeed_zero2": "trainer=deepspeed_zero2",
    "deepspeed_zero2_offload": f"trainer=deepspeed_zero2 {_OFFLOAD}",
    "fsdp": "trainer=fsdp",
    "deepspeed_zero3": "trainer=deepspeed_zero3",
    "deepspeed_zero3_offload": f"trainer=deepspeed_zero3 {_OFFLOAD}",
}
DESCRIPTION = "Memory plan for distilling into the 9B student on N GPUs: which trainer=... fits, and why."


def render(
    s: Shape,
    t: Shape | None,
    plugins: dict[str, int],
    gpus: Sequence[int],
    gpus_per_node: int,
    gpu_gb: float,
    micro_batch: int,
    seq_len: int,
    teacher_dtype: str,
    teacher_placement: str,
) -> str:
    _, _, source = _deepspeed_estimators()
    lines = [
        f"# Memory plan: student {s.name}, teacher {t.name if t else 'none'} ({teacher_dtype}, {teacher_placement})"
    ]
    lines += ["", "## Parameters", "", "| module | student | teacher |", "|---|---:|---:|"]
    for g in ("embeddings", "attention", "mlp", "norms", "lm_head"):
        lines.append(f"| {g} | {s.groups.get(g, 0):,} | {t.groups.get(g, 0) if t else 0:,} |")
    lines.append(f"| **decoder total** | **{s.params:,}** | **{t.params if t else 0:,}** |")
    for name, n in plugins.items():
        lines.append(f"| plugin {name} (encoder + projector + gate) | {n:,} | |")
    lines.append(f"| largest single module (ZeRO-3 gather) | {s.largest_layer:,} | {t.largest_layer if t else 0:,} |")
    lines += [
        "",
        f"## Per-GPU memory (GB) at micro-batch {micro_batch} x {seq_len} tokens, {gpu_gb:g} GB GPUs,"
        f" {gpus_per_node} GPUs/node",
        f"(model states: {source}; + teacher + activations + {_gb(OVERHEAD_BYTES)} GB overhead; host = the student's"
        " states in host RAM on the busiest node; each rank loads its teacher onto its GPU directly)",
        "",
        "| GPUs | strategy | model states | teacher | activations (no ckpt / ckpt) | total (no ckpt / ckpt) | host |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    recs = []
    for n in gpus:
        rows = plan_rows(s, t, n, gpus_per_node, micro_batch, seq_len, teacher_dtype, teacher_placement)
        by = {(r.strategy, r.checkpointing): r for r in rows}
        for strategy in STRATEGIES:
            a, b = by[(strategy, False)], by[(strategy, True)]
            fit = lambda r: "" if r.total <= 0.9 * gpu_gb * GB else " ✗"  # noqa: E731
            lines.append(
                f"| {n} | {strategy} | {_gb(a.states)} | {_gb(a.teacher)} | {_gb(a.activations)} / {_gb(b.activations)}"
                f" | {_gb(a.total)}{fit(a)} / {_gb(b.total)}{fit(b)} | {_gb(a.host)} |"
            )
        recs.append((n, recommend(rows, gpu_gb * GB)))
    lines += ["", "✗ = over 90% of the GPU. Recommended (fewest collectives that fit; offload last):", ""]
    for n, r in recs:
        nodes = max(1, math.ceil(n / gpus_per_node))
        if r is None:
            lines.append(f"- {n} GPUs: nothing fits; lower data.seq_len/data.batch_size or use an int8 teacher")
            continue
        ckpt = " + activation checkpointing" if r.checkpointing else ""
        lines.append(
            f"- {n} GPUs: **{r.strategy}{ckpt}**, {_gb(r.total)} GB/GPU: `python train.py recipe=distill"
            f" model=autoglm_phone_9b {TRAINER_CONFIG[r.strategy]} trainer.devices={min(n, gpus_per_node)}"
            f" trainer.num_nodes={nodes} data.batch_size={micro_batch} data.seq_len={seq_len} teacher=hf"
            f" teacher.path=...{' teacher.shard=true' if r.teacher_sharded else ''}"
            f"{CHECKPOINTING_OVERRIDE if r.checkpointing else ''}`"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m autoglm_train.plan", description=DESCRIPTION)
    p.add_argument("--model", default="autoglm_phone_9b", help="conf/model/<name>.yaml or a yaml path")
    p.add_argument("--tokenizer-size", type=int, default=151552, help="only used when the model yaml has no vocab")
    p.add_argument("--teacher", default="glm4-9b", help="built-in name, config.json path or HF dir; 'none' = no KD")
    p.add_argument("--teacher-dtype", choices=("bf16", "int8"), default="bf16")
    p.add_argument("--teacher-placement", choices=("replicated", "sharded"), default="replicated")
    p.add_argument("--plugins", nargs="*", default=["vision", "speech"])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args(argv)
    s = student_shape(args.model, args.tokenizer_size)
    t = None if args.teacher == "none" else teacher_shape(args.teacher)
    plugins = plugin_params(args.plugins, s.hidden)
    text = render(
        s,
        t,
        plugins,
        args.gpus,
        args.gpus_per_node,
        args.gpu_gb,
        args.micro_batch,
        args.seq_len,
        args.teacher_dtype,
        args.teacher_placement,
    )
    print(text)
    return text


def _gb(x: float) -> str:
    """Bytes as GB with one decimal (the report's unit)."""
    return f"{x / GB:,.1f}"
