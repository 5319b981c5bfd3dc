"""Per-GPU memory of each strategy: the student's model states, the teacher, activations, and the pick.

The formulas are the ones :mod:`autoglm_train.plan` describes; model states come from DeepSpeed's own estimators
(or exact mirrors of them when DeepSpeed is not installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoglm_train.plan.shapes import Shape

GB = 1e9
OVERHEAD_BYTES = 4 * GB
# Preference order: fewest collectives and no host round-trips first (ZeRO-2 only reduce-scatters gradients;
# FSDP/ZeRO-3 also all-gather weights in forward and backward); CPU offload (host Adam step) last.
STRATEGIES = ("ddp", "deepspeed_zero2", "fsdp", "deepspeed_zero3", "deepspeed_zero2_offload", "deepspeed_zero3_offload")


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
