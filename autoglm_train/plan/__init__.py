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

The counts are in :mod:`.shapes`, the per-GPU bytes and the pick in :mod:`.memory`, the report and the command
line in :mod:`.report`.
"""

from autoglm_train.plan.memory import (
    GB,
    OVERHEAD_BYTES,
    STRATEGIES,
    Row,
    _deepspeed_estimators,
    activation_bytes,
    model_states,
    plan_rows,
    recommend,
    teacher_bytes,
)
from autoglm_train.plan.report import TRAINER_CONFIG, main, render
from autoglm_train.plan.shapes import REPO_CONF, Shape, plugin_params, shape_of, student_shape, teacher_shape

__all__ = [
    "GB",
    "OVERHEAD_BYTES",
    "REPO_CONF",
    "STRATEGIES",
    "TRAINER_CONFIG",
    "Row",
    "Shape",
    "_deepspeed_estimators",
    "activation_bytes",
    "main",
    "model_states",
    "plan_rows",
    "plugin_params",
    "recommend",
    "render",
    "shape_of",
    "student_shape",
    "teacher_bytes",
    "teacher_shape",
]
