"""Memory plan for distilling into the 9B student on N GPUs: which ``trainer=...`` fits, and why.

``python -m autoglm_train.plan`` (defaults: ``model=autoglm_phone_9b``, a GLM-4-9B-shaped bf16 teacher, 8 and 16
GPUs of 80 GB, micro-batch 1 x 4096 tokens). Every count comes from the real modules built on the meta device
(nothing is allocated), so the plan runs in seconds on a laptop.

What is counted, per GPU:

* **Model states** of the student (weights, grads, optimizer), from DeepSpeed's own estimators
  ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` (the functions behind
  ``estimate_zero{2,3}_model_states_mem_needs_all_cold``; mirrored here when DeepSpeed is not installed). They
  assume 16-bit weights + fp32 master weights and Adam moments: 2 + 16 bytes/param, 18 of them sharded. ZeRO-3 is
  taken with ``zero_init=True``: the distill task builds the student under ``zero.Init``. DDP keeps
  everything replicated (fp32 weights + grads + Adam = 16 B/param); FSDP2 (fp32 sharded weights, bf16 autocast)
  holds 16 B/param / N plus its gathered units: the root unit (embeddings + final norm + lm_head, kept gathered
  for the step) and two decoder layers (current + prefetched), in fp32.
* **Teacher**: the frozen teacher's weights on every rank (it is not a submodule of the task, so no strategy shards
  it): bf16 2 B/param; int8 (bitsandbytes) 1 B/param for Linear weights, embeddings and lm_head stay bf16.
  ``sharded`` (``--teacher-placement sharded``) = ``teacher.shard=true``, which only ZeRO-3 offers: DeepSpeed
  ZeRO-3 inference partitions the teacher too (weights / N + the largest layer gathered); other strategies keep
  it replicated.
* **Activations** of the student for backward, bf16, SDPA/flash attention (no T x T scores kept), per token per
  decoder layer: RMSNorm in + out (2h) + q, k, v (h + 2 h_kv) + attention output (h) for attention; RMSNorm in +
  out (2h) + gate_up (2f) + SiLU(gate) (f) + product (f) for the MLP: **2 bytes x (6h + 2 h_kv + 4f)**. With
  activation checkpointing per layer: every layer's input (2h bytes) + one layer recomputed. Plus the KD working
  set: the teacher's final hidden states (2 h_t bytes/token), one chunk of logits for teacher and student (4
  fp32 tensors of chunk x V, twice for the checkpointed recompute), and the teacher's forward transient (one layer,
  2 bytes x (4 h_t + 3 f_t) per token, no grad).
* **Overhead**: CUDA context, NCCL buffers, allocator fragmentation: a flat 4 GB.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"
GB = 1e9
OVERHEAD_BYTES = 4 * GB
# Teachers known by name (shapes of public configs); anything else: a config.json path or an HF model dir.
BUILTIN_TEACHERS = {
    "glm4-9b": "model/autoglm_phone_9b.yaml",  # GLM-4-9B text shape: the same 151,552-token tokenizer as the student
}
CHECKPOINTING_OVERRIDE = " '+callbacks=[{_target_: autoglm_train.tasks.recompute.ActivationCheckpointing}]'"
# Preference order: fewest collectives and no host round-trips first (ZeRO-2 only reduce-scatters gradients;
# FSDP/ZeRO-3 also all-gather weights in forward and backward); CPU offload (host Adam step) last.
STRATEGIES = ("ddp", "deepspeed_zero2", "fsdp", "deepspeed_zero3", "deepspeed_zero2_offload", "deepspeed_zero3_offload")
_OFFLOAD = "trainer.strategy.offload_optimizer=true optim=deepspeed_cpu_adam"
TRAINER_CONFIG = {
    "ddp": "trainer=ddp",
    "deepspeed_zero2": "trainer=deepspeed_zero2",
    "deepspeed_zero2_offload": f"trainer=deepspeed_zero2 {_OFFLOAD}",
    "fsdp": "trainer=fsdp",
    "deepspeed_zero3": "trainer=deepspeed_zero3",
    "deepspeed_zero3_offload": f"trainer=deepspeed_zero3 {_OFFLOAD}",
}


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (meta device)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """What the memory formulas need from a decoder."""

    name: str
    params: int
    groups: dict[str, int]
    """embeddings / attention / mlp / norms / lm_head (tied heads count under embeddings only)."""
    largest_layer: int
    """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``): embeddings or head."""
    per_layer: int
    root_unit: int
    """Parameters outside the decoder layers (FSDP2's root unit)."""
    hidden: int
    kv_hidden: int
    ffn: int
    layers: int
    vocab: int
    linear_params: int = 0
    """Parameters in the decoder layers' Linear weights (what int8 loading quantizes)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _group(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def shape_of(model: torch.nn.Module, name: str) -> Shape:
    """Counts of a transformers causal LM (any device, meta included); tied weights counted once."""
    cfg = model.config
    seen: set[int] = set()
    groups = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head"), 0)
    linear = 0
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = _group(pname)
        groups[g] = groups.get(g, 0) + p.numel()
        if g in ("attention", "mlp") and pname.endswith(".weight"):
            linear += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    backbone = getattr(model, model.base_model_prefix)
    per_layer = sum(p.numel() for p in backbone.layers[0].parameters())
    total = sum(groups.values())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(
        name=name,
        params=total,
        groups={k: v for k, v in groups.items() if v or k != "other"},
        largest_layer=largest,
        per_layer=per_layer,
        root_unit=total - per_layer * cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        kv_hidden=cfg.num_key_value_heads * head_dim,
        ffn=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size,
        linear_params=linear,
    )


def _meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def student_shape(model: str = "autoglm_phone_9b", tokenizer_size: int = 151552) -> Shape:
    """The student decoder of ``conf/model/<model>.yaml`` (or a yaml path), built on the meta device."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from autoglm_train.model.decoder import build_decoder

    path = Path(model) if model.endswith(".yaml") else REPO_CONF / "model" / f"{model}.yaml"
    spec = instantiate(OmegaConf.load(path))
    decoder = build_decoder(spec, tokenizer_size, pad_token_id=0, device="meta")
    return shape_of(decoder, spec.name)


def teacher_shape(teacher: str) -> Shape:
    """A teacher by built-in name (``glm4-9b``), ``config.json`` path, or HF model directory (offline)."""
    if teacher in BUILTIN_TEACHERS:
        shape = student_shape(str(REPO_CONF / BUILTIN_TEACHERS[teacher]))
        shape.name = teacher
        return shape
    from transformers import AutoConfig

    path = Path(teacher).expanduser()
    if path.is_file():
        config = AutoConfig.for_model(**json.loads(path.read_text()))
    elif path.is_dir():
        config = AutoConfig.from_pretrained(path)
    else:
        raise FileNotFoundError(
            f"teacher {teacher!r}: not a built-in ({', '.join(BUILTIN_TEACHERS)}), config.json or model directory"
        )
    return shape_of(_meta_model(config), path.parent.name if path.is_file() else path.name)


def plugin_params(names: Sequence[str], hidden_size: int) -> dict[str, int]:
    """Encoder + projector + gate parameters of each ``conf/plugin/<name>.yaml`` at the decoder's width."""
    from omegaconf import OmegaConf

    from autoglm_train.model.registry import instantiate_plugin

    out = {}
    for name in names:
        cfg = OmegaConf.load(REPO_CONF / "plugin" / f"{name}.yaml")
        cfg = OmegaConf.merge(cfg, {"hidden_size": hidden_size})
        with torch.device("meta"):
            plugin = instantiate_plugin(cfg)
        out[name] = sum(p.numel() for p in plugin.parameters())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def _deepspeed_estimators():
    """DeepSpeed's pure estimator functions, or exact mirrors of them (deepspeed 0.19) when it is not installed."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

        return zero2, zero3, "deepspeed"
    except ImportError:
        pass

    def zero2(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True, additional_buffer_factor=1.5):
        total_gpus = num_nodes * num_gpus_per_node
        if cpu_offload:
            return int(total_params * max(4 * total_gpus, 16) * additional_buffer_factor), int(2 * total_params)
        gpu = 2 * total_params + int(18 * total_params / total_gpus)
        return int(total_params * 4 * num_gpus_per_node * additional_buffer_factor), int(gpu)

    def zero3(
        total_params,
        largest_layer_params,
        num_gpus_per_node=1,
        num_nodes=1,
        cpu_offload=True,
        cpu_offload_params=True,
        zero_init=True,
        additional_buffer_factor=1.5,
    ):
        total_gpus = num_nodes * num_gpus_per_node
        gpus_factor = 1 / num_nodes
        largest = 4 * largest_layer_params
        if cpu_offload:
            gpu = largest if cpu_offload_params else largest + int(2 * total_params / total_gpus)
            states = 18 if cpu_offload_params else 16
            per = states * gpus_factor if zero_init else max(4 * num_gpus_per_node, states * gpus_factor)
            cpu = total_params * per * additional_buffer_factor
        else:
            gpu = largest + int(18 * total_params / total_gpus)
            base = largest_layer_params if zero_init else total_params
            cpu = base * 4 * num_gpus_per_node * additional_buffer_factor
        return int(cpu), int(gpu), largest

    return zero2, zero3, "mirror of deepspeed 0.19 formulas"


def model_states(strategy: str, s: Shape, n_gpus: int, gpus_per_node: int) -> tuple[float, float]:
    """(GPU bytes per rank, host bytes on the busiest node) for the student's weights + grads + optimizer.

    Host: the distill task builds the student inside ``configure_model`` (:mod:`autoglm_train.tasks.student_build`):
    on each GPU directly (DDP, ZeRO-2), partitioned as it is constructed (ZeRO-3, DeepSpeed's ``zero_init=True``),
    or whole on rank 0's host only (FSDP2). So the host holds the student only there and for offloaded states.
    """
    zero2, zero3, _ = _deepspeed_estimators()
    nodes = max(1, math.ceil(n_gpus / gpus_per_node))
    per_node = min(gpus_per_node, n_gpus)
    if strategy == "ddp":
        return 16.0 * s.params, 0.0
    if strategy == "fsdp":
        gathered = 4.0 * (s.root_unit + 2 * s.per_layer)
        return 16.0 * s.params / n_gpus + gathered, 4.0 * s.params  # rank 0 builds the fp32 student, then shards it
    offload = strategy.endswith("offload")
    if strategy.startswith("deepspeed_zero2"):
        cpu, gpu = zero2(s.params, per_node, nodes, cpu_offload=offload)
        return float(gpu), float(cpu) if offload else 0.0  # without offload DeepSpeed's host figure is a host build
    cpu, gpu, _ = zero3(s.params, s.largest_layer, per_node, nodes, offload, False, True)
    return float(gpu), float(cpu)


def teacher_bytes(t: Shape, dtype: str, placement: str, n_gpus: int) -> float:
    """The frozen teacher's weights per GPU: ``replicated`` or ZeRO-3-inference ``sharded`` (``teacher.shard``)."""
    if dtype == "bf16":
        full = 2.0 * t.params
    elif dtype == "int8":
        full = 1.0 * t.linear_params + 2.0 * (t.params - t.linear_params)
    else:
        raise ValueError(f"teacher dtype {dtype!r}: bf16 | int8")
    if placement == "replicated":
        return full
    if dtype == "int8":
        raise ValueError("a sharded teacher cannot be int8: DeepSpeed does not partition bitsandbytes weights")
    return full / n_gpus + 2.0 * t.largest_layer


def activation_bytes(
    s: Shape, t: Shape | None, micro_batch: int, seq_len: int, checkpointing: bool, chunk: int = 256
) -> float:
    """Student activations kept for backward + the KD working set, per GPU (formulas in the module docstring)."""
    tokens = micro_batch * seq_len
    layer = 2.0 * (6 * s.hidden + 2 * s.kv_hidden + 4 * s.ffn)
    student = (s.layers * 2.0 * s.hidden + layer) if checkpointing else s.layers * layer
    student += 2.0 * 2 * s.hidden  # final norm in + out
    kd = 2 * 4 * 4.0 * min(chunk, tokens) * s.vocab / tokens  # per token share of the chunk logits
    teacher = 0.0
    if t is not None:
        teacher = 2.0 * t.hidden + 2.0 * (4 * t.hidden + 3 * t.ffn)
    return tokens * (student + kd + teacher)


@dataclass
class Row:
    strategy: str
    n_gpus: int
    states: float
    host: float
    teacher: float
    activations: float
    checkpointing: bool
    teacher_sharded: bool = False

    @property
    def total(self) -> float:
        return self.states + self.teacher + self.activations + OVERHEAD_BYTES


def plan_rows(
    s: Shape,
    t: Shape | None,
    n_gpus: int,
    gpus_per_node: int,
    micro_batch: int,
    seq_len: int,
    teacher_dtype: str,
    teacher_placement: str,
) -> list[Row]:
    rows = []
    for strategy in STRATEGIES:
        sharded = teacher_placement == "sharded" and strategy.startswith("deepspeed_zero3")  # teacher.shard: ZeRO-3
        tb = teacher_bytes(t, teacher_dtype, "sharded" if sharded else "replicated", n_gpus) if t is not None else 0.0
        states, host = model_states(strategy, s, n_gpus, gpus_per_node)
        for ckpt in (False, True):
            activations = activation_bytes(s, t, micro_batch, seq_len, ckpt)
            rows.append(Row(strategy, n_gpus, states, host, tb, activations, ckpt, sharded))
    return rows


def recommend(rows: list[Row], gpu_bytes: float, headroom: float = 0.9) -> Row | None:
    """The first strategy in STRATEGIES order that fits; per strategy, without recompute before with it.

    So ZeRO-2 + activation checkpointing wins over ZeRO-3 without: recomputing a layer costs ~1/3 more compute on
    the GPU, ZeRO-3 adds two weight all-gathers per step over the (slower, inter-node) network.
    """
    fitting = [r for r in rows if r.total <= headroom * gpu_bytes]
    for strategy in STRATEGIES:
        for ckpt in (False, True):
            for r in fitting:
                if r.strategy == strategy and r.checkpointing == ckpt:
                    return r
    return None


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / GB:,.1f}"


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
    p = argparse.ArgumentParser(prog="python -m autoglm_train.plan", description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    main()
