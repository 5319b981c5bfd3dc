"""student.init=teacher: the Llama→GLM mapping is exact, and layers/units are kept by their measured score."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from autoglm_train.distill import importance as imp
from autoglm_train.distill.teacher_init import (
    StudentInitSpec,
    TeacherNotMappableError,
    check_mappable,
    full_selection,
    load_mapped,
    map_to_glm,
    rotary_permutation,
    select,
    student_spec,
    teacher_initialised,
)
from autoglm_train.model.decoder import DecoderSpec, build_decoder

V = 100  # the teacher tokenizer's size; the student has placeholder/padding rows beyond it
SHAPE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
)


def _shape(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, **extra: int) -> DecoderSpec:
    """A student shape: hidden size, layers, query heads, KV heads, FFN channels."""
    return DecoderSpec(
        name="s",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        **extra,
    )


MODEL = _shape(64, 3, 4, 2, 96)


def _teacher(cls=LlamaForCausalLM, config_cls=LlamaConfig, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(config_cls(**{**SHAPE, **kw})).eval()
    with torch.no_grad():  # weights of realistic scale, so attention and rotary actually matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model


def _student(teacher, init: StudentInitSpec, model: DecoderSpec = MODEL, batches=None):
    spec = student_spec(teacher.config, model, init)
    sel = full_selection(teacher.config) if batches is None else select(teacher, spec, init, batches)
    student = build_decoder(spec, V + 8, 0, 1).eval()  # + modality placeholders, padded to 64 rows
    load_mapped(student, map_to_glm(teacher, sel, V))
    return student, sel


def _batches(n: int = 2, t: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n, t + 1), generator=g)
    return [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]


FULL = StudentInitSpec(init="teacher", width="teacher", num_layers=5)


@pytest.mark.parametrize(
    ("cls", "config_cls", "kw"),
    [
        (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": True}),
        (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": False, "head_dim": 32}),
        (Qwen2ForCausalLM, Qwen2Config, {"tie_word_embeddings": False}),  # q/k/v bias → GLM attention_bias
    ],
)
def test_full_depth_mapping_gives_the_teachers_logits(cls, config_cls, kw) -> None:
    teacher = _teacher(cls, config_cls, **kw)
    check_mappable(teacher)
    student, _ = _student(teacher, FULL)
    assert type(student).__name__ == "GlmForCausalLM"
    assert student.config.partial_rotary_factor == 1.0 if hasattr(student.config, "partial_rotary_factor") else True
    assert student.config.vocab_size == 128 and student.config.attention_bias == (cls is Qwen2ForCausalLM)
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        want, got = teacher(ids).logits, student(ids).logits
    assert want.abs().max() > 1.0  # not a degenerate all-zero comparison
    torch.testing.assert_close(got[..., :V], want, atol=1e-4, rtol=0)


def test_rotary_permutation_interleaves_the_halves() -> None:
    assert rotary_permutation(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_the_real_teacher_maps_exactly(teacher_spec, student_tok) -> None:
    """SmolLM2-135M (the default teacher) as a 30-layer GLM: the same logits on real text."""
    from autoglm_train.distill.teacher import load_teacher

    teacher = load_teacher(teacher_spec)
    spec = student_spec(teacher.config, MODEL, StudentInitSpec(init="teacher", width="teacher", num_layers=30))
    student = build_decoder(spec, len(student_tok), student_tok.pad_token_id, student_tok.eos_token_id).eval()
    vocab = teacher.config.vocab_size
    load_mapped(student, map_to_glm(teacher, full_selection(teacher.config), vocab))
    ids = student_tok("ROMEO. But soft, what light through yonder window breaks?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits[..., :vocab], teacher(ids).logits, atol=1e-4, rtol=0)


def _make_identity(teacher, layers: list[int]) -> None:
    """Blocks whose attention and MLP write nothing: h_out == h_in exactly, so their scores are exactly 0."""
    with torch.no_grad():
        for i in layers:
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()


def test_block_influence_drops_the_identity_blocks() -> None:
    teacher = _teacher()
    _make_identity(teacher, [1, 3])
    batches = _batches()
    scores = imp.measure_importance(teacher, batches).block_influence
    assert scores[[1, 3]].abs().max() < 1e-6 and (scores[[0, 2, 4]] > 1e-3).all()
    init = StudentInitSpec(init="teacher", width="teacher", num_layers=3)
    student, sel = _student(teacher, init, batches=batches)
    assert sel.layers == [0, 2, 4] and abs(sel.scores["block_influence"][1]) < 1e-6
    ids = batches[0]["input_ids"]
    with torch.no_grad():  # dropping blocks that did nothing leaves the logits unchanged
        torch.testing.assert_close(student(ids).logits[..., :V], teacher(ids).logits, atol=1e-4, rtol=0)
    even = StudentInitSpec(init="teacher", width="teacher", num_layers=3, layer_score="even")
    assert _student(teacher, even, batches=batches)[1].layers == imp.evenly_spaced(5, 3) == [0, 2, 4]


def test_ppl_drop_scores_each_block_by_removing_it() -> None:
    teacher = _teacher()
    _make_identity(teacher, [2])
    batches = _batches()
    drops = imp.perplexity_drop(teacher, batches)
    base = imp.calibration_nll(teacher, batches)
    with imp.kept_layers(teacher, [0, 1, 3, 4]):
        assert imp.calibration_nll(teacher, batches) == pytest.approx(base, abs=1e-6)
    with imp.kept_layers(teacher, [1, 2, 3, 4]):
        assert float(drops[0]) == pytest.approx(imp.calibration_nll(teacher, batches) - base, abs=1e-6)
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 5  # restored
    assert abs(float(drops[2])) < 1e-6
    init = StudentInitSpec(init="teacher", width="teacher", num_layers=2, layer_score="ppl_drop")
    sel = select(teacher, student_spec(teacher.config, MODEL, init), init, batches)
    assert sel.layers == imp.select_top(drops, 2) and sel.scores["ppl_drop"] == pytest.approx(drops.tolist(), abs=1e-5)


def test_select_top_keeps_the_highest_in_order() -> None:
    assert imp.select_top(torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0]), 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="cannot keep 6 of 5"):
        imp.select_top(torch.zeros(5), 6)


def test_width_pruning_keeps_the_live_heads_and_channels() -> None:
    """Dead units (a KV group whose values are 0, FFN channels whose gate/up rows are 0) contribute nothing: pruned
    by activation importance, the narrower student gives exactly the teacher's logits."""
    teacher = _teacher()
    dead_ffn = list(range(0, 96, 2))  # half of every block's FFN channels
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[16:32].zero_()  # kv head 1 (query heads 2 and 3) outputs 0
            layer.mlp.gate_proj.weight[dead_ffn] = 0.0
            layer.mlp.up_proj.weight[dead_ffn] = 0.0
    narrow = _shape(64, 5, 2, 1, 48, head_dim=16)
    batches = _batches()
    student, sel = _student(teacher, StudentInitSpec(init="teacher", width="model"), narrow, batches)
    assert sel.kv_groups[0] == [0] and sel.q_heads[0] == [0, 1]
    assert sel.ffn[0] == list(range(1, 96, 2))
    assert student.config.intermediate_size == 48 and student.config.num_attention_heads == 2
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits[..., :V], teacher(ids).logits, atol=1e-4, rtol=0)


def test_narrower_hidden_size_builds_and_runs() -> None:
    teacher = _teacher()
    narrow = _shape(32, 2, 2, 1, 40)
    spec, state, sel = teacher_initialised(teacher, narrow, StudentInitSpec(init="teacher"), _batches(), V)
    assert spec.hidden_size == 32 and len(sel.hidden) == 32 and len(sel.layers) == 2
    student = build_decoder(spec, V + 8, 0, 1)
    load_mapped(student, state)
    assert torch.isfinite(student(_batches()[0]["input_ids"]).logits).all()


@pytest.mark.parametrize(
    ("teacher", "why"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V)), "model_type 'gpt2'"),
        (lambda: _teacher(attention_bias=True), "bias on o_proj"),
        (lambda: _teacher(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda: _teacher(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}), "rope_type"),
    ],
)
def test_an_unmappable_teacher_is_refused_in_one_line(teacher, why) -> None:
    with pytest.raises(TeacherNotMappableError, match="cannot be mapped to GLM") as info:
        check_mappable(teacher())
    assert why in str(info.value) and "\n" not in str(info.value)


def test_shapes_the_teacher_cannot_reach_are_refused() -> None:
    teacher = _teacher()
    wide = _shape(128, 2, 8, 2, 96)
    with pytest.raises(ValueError, match=r"model.hidden_size=128 > 64"):
        student_spec(teacher.config, wide, StudentInitSpec(init="teacher"))
    with pytest.raises(ValueError, match=r"num_hidden_layers=7 > the teacher's 5"):
        student_spec(teacher.config, MODEL, StudentInitSpec(init="teacher", num_layers=7))
    with pytest.raises(ValueError, match=r"student.init='copy'"):
        StudentInitSpec(init="copy")


def test_distill_recipe_starts_from_the_teacher(tmp_path) -> None:
    """recipe=distill student.init=teacher: the real SmolLM2 teacher, pruned to a 2-layer, 128-wide GLM, trains."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from recipes.distill import run
    from tests.conftest import CACHE, REPO
    from tests.micro_distill import MICRO_SHAPE, write_micro_corpus

    shape = [o for o in MICRO_SHAPE if not o.startswith(("model.hidden_size", "model.intermediate", "model.num_"))]
    overrides = [
        "recipe=distill",
        *shape,
        f"data.source={write_micro_corpus(tmp_path / 'corpus.jsonl')}",
        "model.hidden_size=128",
        "model.num_attention_heads=2",
        "model.num_key_value_heads=1",
        "model.intermediate_size=256",
        "model.num_hidden_layers=2",
        "student.init=teacher",
        "student.calibration_blocks=4",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "recipe.sample_max_new_tokens=2",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={CACHE}",
        "run_name=t",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        summary = run(compose(config_name="train", overrides=overrides))
    init = summary["student_init"]
    assert init["init"] == "teacher" and len(init["layers"]) == 2 and len(init["block_influence"]) == 30
    assert init["layers"] == imp.select_top(torch.tensor(init["block_influence"]), 2)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "t" / "student")
    config = student.config
    shape = (config.hidden_size, config.num_hidden_layers, config.head_dim, config.intermediate_size)
    assert shape == (128, 2, 64, 256)
    assert config.rope_parameters["partial_rotary_factor"] == 1.0 and not config.attention_bias
    assert summary["val/ppl"] == summary["val/ppl"]
