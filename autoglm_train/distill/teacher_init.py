"""A GLM student initialised from the teacher's own weights (``student.init=teacher``), not from random numbers.

Two steps, each checkable on its own:

1. **Exact mapping** of a Llama-shaped teacher (Llama, Mistral without a sliding window, Qwen2) into a stock
   ``GlmForCausalLM``: GLM rotates interleaved pairs ``(2i, 2i+1)`` of each head where Llama rotates ``(i, i+d/2)``,
   so the q/k rows of every head are permuted (the dot products, hence attention, are unchanged); gate and up
   projections are fused as ``[gate; up]``; full rotary (``partial_rotary_factor=1``); q/k/v bias only when the
   teacher has it (GLM has no o_proj bias). At full depth and width the GLM's logits equal the teacher's.
2. **Selection** to the student's shape by measured importance (:mod:`autoglm_train.distill.importance`): the
   decoder blocks with the highest block influence or perplexity drop, then (only when the configured student is
   narrower) the hidden channels, KV groups / query heads and FFN channels with the highest activation importance.

Placeholder rows for the modality tokens (beyond the teacher's tokenizer) keep Hugging Face's init, as a randomly
initialised student's do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from autoglm_train.errors import ConfigValueError
from autoglm_train.model.decoder import DecoderSpec

log = logging.getLogger(__name__)

INITS = ("random", "teacher")
WIDTHS = ("model", "teacher")
LAYER_SCORES = ("block_influence", "ppl_drop", "even")
MAPPABLE = ("llama", "mistral", "qwen2")


class TeacherNotMappableError(ConfigValueError):
    """The teacher's architecture has no exact GLM form."""


@dataclass
class StudentInitSpec:
    """How the student's weights start (``conf/student``)."""

    init: str = "random"
    """``random``: Hugging Face's init of ``conf/model``'s shape; ``teacher``: the teacher's weights, selected."""
    width: str = "model"
    """With ``init=teacher``: ``model`` prunes hidden size, heads and FFN to ``conf/model``'s shape; ``teacher``
    keeps the teacher's full width (only layers are dropped)."""
    num_layers: int | None = None
    """Decoder blocks kept; ``None`` = ``model.num_hidden_layers``."""
    layer_score: str = "block_influence"
    """Which blocks stay: ``block_influence`` (1 - cos(h_in, h_out)), ``ppl_drop`` (NLL rise when the block is
    removed; one calibration pass per block) or ``even`` (evenly spaced, the naive baseline)."""
    calibration_blocks: int = 8
    """Training blocks the scores are measured on (the first ones of the train split)."""
    calibration_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigValueError(f"student.init={self.init!r}; expected one of {list(INITS)}")
        if self.width not in WIDTHS:
            raise ConfigValueError(f"student.width={self.width!r}; expected one of {list(WIDTHS)}")
        if self.layer_score not in LAYER_SCORES:
            raise ConfigValueError(f"student.layer_score={self.layer_score!r}; expected one of {list(LAYER_SCORES)}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigValueError(f"student.num_layers={self.num_layers} must be >= 1 (or null)")
        if self.calibration_blocks < 1 or self.calibration_batch_size < 1:
            raise ConfigValueError("student.calibration_blocks and student.calibration_batch_size must be >= 1")


# ---------------------------------------------------------------------------
# Refusal and shape
# ---------------------------------------------------------------------------


def check_mappable(teacher: nn.Module) -> None:
    """Raise :class:`TeacherNotMappableError` with one line naming why the teacher has no exact GLM form."""
    config = teacher.config
    kind = getattr(config, "model_type", type(teacher).__name__)

    def refuse(why: str) -> None:
        raise TeacherNotMappableError(f"student.init=teacher: the {kind} teacher cannot be mapped to GLM: {why}")

    if kind not in MAPPABLE:
        refuse(f"only {'/'.join(MAPPABLE)}-shaped teachers are mapped (no mapping for model_type {kind!r})")
    if any(p.dtype in (torch.int8, torch.uint8) for p in teacher.parameters()):
        refuse("its weights are int8 (teacher.load_in_8bit=true); load it in float")
    if getattr(config, "hidden_act", "silu") != "silu":
        refuse(f"hidden_act={config.hidden_act!r} (GLM's MLP is SwiGLU)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope_type={rope.get('rope_type')!r} (only plain RoPE is mapped)")
    if getattr(config, "mlp_bias", False):
        refuse("mlp_bias=true (GLM's MLP has no bias)")
    if kind in ("llama", "mistral") and getattr(config, "attention_bias", False):
        refuse("attention_bias=true puts a bias on o_proj (GLM's o_proj has none)")
    if getattr(config, "sliding_window", None) and (kind == "mistral" or getattr(config, "use_sliding_window", False)):
        refuse(f"sliding-window attention ({config.sliding_window} tokens; GLM attends to the full context)")
    head_dim = _head_dim(config)
    if head_dim % 2:
        refuse(f"odd head_dim={head_dim}")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv_bias(config) -> bool:
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


def student_spec(teacher_config, model: DecoderSpec, init: StudentInitSpec) -> DecoderSpec:
    """The GLM shape a teacher-initialised student gets: the teacher's layout at ``model``'s (or its own) width."""
    layers = init.num_layers or model.num_hidden_layers
    t = teacher_config
    head_dim = _head_dim(t)
    rope = getattr(t, "rope_parameters", None) or {}
    common = dict(
        head_dim=head_dim,
        vocab_size=None,
        vocab_multiple=model.vocab_multiple,
        max_position_embeddings=t.max_position_embeddings,
        partial_rotary_factor=1.0,  # Llama rotates every dimension of a head
        rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))),
        attention_bias=_qkv_bias(t),
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=bool(t.tie_word_embeddings),
    )
    if layers > t.num_hidden_layers:
        raise ConfigValueError(
            f"student.num_layers/model.num_hidden_layers={layers} > the teacher's {t.num_hidden_layers} layers"
        )
    if init.width == "teacher":
        width = dict(
            hidden_size=t.hidden_size,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            intermediate_size=t.intermediate_size,
        )
    else:
        m_head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
        t_group = t.num_attention_heads // t.num_key_value_heads
        m_group = model.num_attention_heads // model.num_key_value_heads
        checks = [
            (model.hidden_size <= t.hidden_size, f"model.hidden_size={model.hidden_size} > {t.hidden_size}"),
            (m_head_dim == head_dim, f"the student's head_dim {m_head_dim} != the teacher's {head_dim}"),
            (
                model.num_key_value_heads <= t.num_key_value_heads,
                f"model.num_key_value_heads={model.num_key_value_heads} > {t.num_key_value_heads}",
            ),
            (m_group <= t_group, f"{m_group} query heads per KV head > the teacher's {t_group}"),
            (
                model.intermediate_size <= t.intermediate_size,
                f"model.intermediate_size={model.intermediate_size} > {t.intermediate_size}",
            ),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigValueError(
                    f"student.init=teacher with student.width=model prunes the teacher to conf/model's shape, "
                    f"but {why} "
                    "(use student.width=teacher to keep the teacher's width)"
                )
        width = dict(
            hidden_size=model.hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_key_value_heads,
            intermediate_size=model.intermediate_size,
        )
    return replace(model, name=f"{model.name}-from-teacher", num_hidden_layers=layers, **width, **common)


# ---------------------------------------------------------------------------
# Selection and mapping
# ---------------------------------------------------------------------------


@dataclass
class Selection:
    """What of the teacher the student keeps (indices into the teacher's units, ascending)."""

    layers: list[int]
    hidden: list[int]
    kv_groups: list[list[int]]
    """Per kept layer, the teacher KV heads kept."""
    q_heads: list[list[int]]
    """Per kept layer, the teacher query heads kept (grouped by kv_groups, each group's heads ascending)."""
    ffn: list[list[int]]
    """Per kept layer, the teacher FFN channels kept."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    """The layer scores the choice was made on, for the log and the run summary."""


def full_selection(config) -> Selection:
    """Everything: the exact full-depth, full-width mapping."""
    n = config.num_hidden_layers
    return Selection(
        layers=list(range(n)),
        hidden=list(range(config.hidden_size)),
        kv_groups=[list(range(config.num_key_value_heads))] * n,
        q_heads=[list(range(config.num_attention_heads))] * n,
        ffn=[list(range(config.intermediate_size))] * n,
    )


def select(teacher: nn.Module, spec: DecoderSpec, init: StudentInitSpec, batches: Sequence[dict]) -> Selection:
    """Choose layers (by ``init.layer_score``), then width units by activation importance, to reach ``spec``."""
    from autoglm_train.distill import importance as imp

    t = teacher.config
    need_width = spec.hidden_size < t.hidden_size or spec.intermediate_size < t.intermediate_size
    need_width = need_width or spec.num_attention_heads < t.num_attention_heads
    scores: dict[str, Tensor] = {}
    measured = None
    if init.layer_score == "block_influence" or need_width:
        measured = imp.measure_importance(teacher, batches)
        scores["block_influence"] = measured.block_influence
    if init.layer_score == "ppl_drop":
        scores["ppl_drop"] = imp.perplexity_drop(teacher, batches)
    if init.layer_score == "even":
        layers = imp.evenly_spaced(t.num_hidden_layers, spec.num_hidden_layers)
    else:
        layers = imp.select_top(scores[init.layer_score], spec.num_hidden_layers)
    full = full_selection(t)
    if not need_width:
        k = len(layers)
        sel = Selection(layers, full.hidden, full.kv_groups[:k], full.q_heads[:k], full.ffn[:k])
    else:
        assert measured is not None
        hidden_score = measured.hidden[layers].sum(0) + measured.final_hidden
        hidden = imp.select_top(hidden_score, spec.hidden_size)
        group = t.num_attention_heads // t.num_key_value_heads
        keep_per_group = spec.num_attention_heads // spec.num_key_value_heads
        kv_groups, q_heads, ffn = [], [], []
        for i in layers:
            head_score = measured.heads[i]
            groups = imp.select_top(head_score.view(t.num_key_value_heads, group).sum(-1), spec.num_key_value_heads)
            kv_groups.append(groups)
            in_group = [imp.select_top(head_score[g * group : (g + 1) * group], keep_per_group) for g in groups]
            q_heads.append([g * group + h for g, hs in zip(groups, in_group, strict=True) for h in hs])
            ffn.append(imp.select_top(measured.ffn[i], spec.intermediate_size))
        sel = Selection(layers=layers, hidden=hidden, kv_groups=kv_groups, q_heads=q_heads, ffn=ffn)
    sel.scores = {k: [round(float(x), 6) for x in v] for k, v in scores.items()}
    return sel


def rotary_permutation(head_dim: int) -> Tensor:
    """Row order that turns a Llama head's (i, i + d/2) rotary pairs into GLM's interleaved (2i, 2i + 1)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()


def map_to_glm(teacher: nn.Module, sel: Selection, vocab_rows: int) -> dict[str, Tensor]:
    """The GLM state dict (``GlmForCausalLM`` keys) of the selected teacher units; float32 CPU copies.

    ``vocab_rows``: the leading embedding / lm_head rows copied (the teacher tokenizer's size); the student's
    further rows (modality placeholders, padding) are not in the returned dict.
    """
    t = teacher.config
    sd = {k: v.detach().float().cpu() for k, v in teacher.state_dict().items()}
    head_dim = _head_dim(t)
    perm = rotary_permutation(head_dim)
    hid = torch.tensor(sel.hidden)

    def rows(w: Tensor, heads: Sequence[int], rotary: bool) -> Tensor:
        w = w.view(-1, head_dim, *w.shape[1:])[torch.tensor(heads)]
        if rotary:
            w = w[:, perm]
        return w.reshape(-1, *w.shape[2:])

    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:vocab_rows][:, hid]}
    for j, i in enumerate(sel.layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        q_heads, kv = sel.q_heads[j], sel.kv_groups[j]
        ffn = torch.tensor(sel.ffn[j])
        out[dst + "self_attn.q_proj.weight"] = rows(sd[src + "self_attn.q_proj.weight"], q_heads, True)[:, hid]
        out[dst + "self_attn.k_proj.weight"] = rows(sd[src + "self_attn.k_proj.weight"], kv, True)[:, hid]
        out[dst + "self_attn.v_proj.weight"] = rows(sd[src + "self_attn.v_proj.weight"], kv, False)[:, hid]
        if _qkv_bias(t):
            out[dst + "self_attn.q_proj.bias"] = rows(sd[src + "self_attn.q_proj.bias"], q_heads, True)
            out[dst + "self_attn.k_proj.bias"] = rows(sd[src + "self_attn.k_proj.bias"], kv, True)
            out[dst + "self_attn.v_proj.bias"] = rows(sd[src + "self_attn.v_proj.bias"], kv, False)
        o = sd[src + "self_attn.o_proj.weight"]
        o = o.view(o.shape[0], -1, head_dim)[:, torch.tensor(q_heads)].reshape(o.shape[0], -1)
        out[dst + "self_attn.o_proj.weight"] = o[hid]
        gate = sd[src + "mlp.gate_proj.weight"][ffn][:, hid]
        up = sd[src + "mlp.up_proj.weight"][ffn][:, hid]
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat([gate, up], dim=0)  # GLM chunks [gate; up]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.down_proj.weight"][hid][:, ffn]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"][hid]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"][hid]
    out["model.norm.weight"] = sd["model.norm.weight"][hid]
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:vocab_rows][:, hid]
    return {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def load_mapped(student: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into ``student``'s leading slices (embedding rows beyond it keep their init)."""
    params = dict(student.named_parameters())
    for key, value in state.items():
        if key not in params:
            raise KeyError(f"mapped weight {key} has no place in the student")
        target = params[key]
        if value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
            raise ValueError(f"{key}: mapped {tuple(value.shape)} does not fit the student's {tuple(target.shape)}")
        target[: value.shape[0]].copy_(value.to(target.dtype))
    tied = student.config.tie_word_embeddings
    missing = [k for k in params if k not in state and not (tied and k == "lm_head.weight")]
    if missing:
        raise KeyError(f"no mapped weight for {missing[:3]}")


def describe(sel: Selection, teacher_config) -> str:
    """One log line: which layers stayed and how much of the width."""
    t = teacher_config
    return (
        f"kept layers {sel.layers} of {t.num_hidden_layers}; hidden {len(sel.hidden)}/{t.hidden_size}, "
        f"heads {len(sel.q_heads[0])}/{t.num_attention_heads} (kv {len(sel.kv_groups[0])}/{t.num_key_value_heads}), "
        f"ffn {len(sel.ffn[0])}/{t.intermediate_size}"
    )


def teacher_initialised(
    teacher: nn.Module, model: DecoderSpec, init: StudentInitSpec, batches: Sequence[dict], vocab_rows: int
) -> tuple[DecoderSpec, dict[str, Tensor], Selection]:
    """(the student's shape, its mapped weights, what was kept): refuses an unmappable teacher first."""
    check_mappable(teacher)
    spec = student_spec(teacher.config, model, init)
    sel = select(teacher, spec, init, batches)
    log.info("student.init=teacher (%s): %s", init.layer_score, describe(sel, teacher.config))
    return spec, map_to_glm(teacher, sel, vocab_rows), sel
