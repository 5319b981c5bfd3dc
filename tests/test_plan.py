"""python -m autoglm_train.plan: meta-device counts, DeepSpeed's estimators, the activation formula, the pick."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from autoglm_train import plan

GLM4_9B = 9_399_951_360


@pytest.fixture(scope="module")
def student():
    return plan.student_shape("autoglm_phone_9b")


def test_student_counts_add_up_to_the_glm4_9b_decoder(student):
    assert student.params == GLM4_9B
    assert sum(student.groups.values()) == GLM4_9B
    g = student.groups
    assert g["embeddings"] == g["lm_head"] == 151552 * 4096  # untied
    # per layer: q 4096x4096 + k,v 4096x256 (+ biases) + o 4096x4096; gate_up 4096x27392 + down 13696x4096
    assert g["attention"] == 40 * (4096 * 4096 + 4096 + 2 * (4096 * 256 + 256) + 4096 * 4096)
    assert g["mlp"] == 40 * 3 * 4096 * 13696
    assert g["norms"] == 40 * 2 * 4096 + 4096
    assert student.largest_layer == 151552 * 4096
    assert student.root_unit == 2 * 151552 * 4096 + 4096
    assert student.linear_params == g["attention"] + g["mlp"] - 40 * (4096 + 2 * 256)  # weights, not biases


def test_teacher_from_a_config_json_matches_the_builtin(tmp_path, student):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from autoglm_train.model.decoder import build_decoder

    spec = instantiate(OmegaConf.load(plan.REPO_CONF / "model" / "autoglm_phone_9b.yaml"))
    config = build_decoder(spec, 151552, 0, device="meta").config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert plan.teacher_shape(str(path)).params == plan.teacher_shape("glm4-9b").params == GLM4_9B
    with pytest.raises(FileNotFoundError, match="built-in"):
        plan.teacher_shape("no-such-teacher")


def test_plugins_are_counted_at_the_decoder_width():
    counts = plan.plugin_params(["vision", "speech"], 4096)
    # ViT-Tiny-shaped (5.4M) + projector 192->4096->4096 + gate; Conformer-Small-shaped (8.9M) + projector
    assert 22_000_000 < counts["vision"] < 24_000_000
    assert 25_000_000 < counts["speech"] < 28_000_000


def test_model_states_are_deepspeeds_estimates(student):
    p = student.params
    gpu, _ = plan.model_states("deepspeed_zero2", student, 8, 8)
    assert gpu == 2 * p + int(18 * p / 8)
    gpu, _ = plan.model_states("deepspeed_zero3", student, 16, 8)
    assert gpu == 4 * student.largest_layer + int(18 * p / 16)
    gpu, _ = plan.model_states("deepspeed_zero3_offload", student, 16, 8)
    assert gpu == 4 * student.largest_layer + int(2 * p / 16)
    assert plan.model_states("ddp", student, 8, 8)[0] == 16 * p


def test_host_memory_follows_where_the_task_builds_the_student(student):
    """configure_model builds on the GPU (DDP, ZeRO-2), under zero.Init (ZeRO-3) or on rank 0's host (FSDP2)."""
    p = student.params
    assert plan.model_states("ddp", student, 8, 8)[1] == 0.0
    assert plan.model_states("deepspeed_zero2", student, 16, 8)[1] == 0.0
    assert plan.model_states("fsdp", student, 16, 8)[1] == 4.0 * p  # one fp32 copy per job, not one per rank
    host = plan.model_states("deepspeed_zero3", student, 16, 8)[1]
    assert host == int(student.largest_layer * 4 * 8 * 1.5)  # DeepSpeed's zero_init=True estimate
    assert host < 4.0 * p * 8 / 10  # a tenth of what 8 ranks each building the fp32 student on the host took


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="compares with DeepSpeed's own functions")
def test_the_fallback_mirrors_deepspeed_exactly(monkeypatch, student):
    ds2, ds3, source = plan._deepspeed_estimators()
    assert source == "deepspeed"
    import builtins

    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name.startswith("deepspeed"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    my2, my3, source = plan._deepspeed_estimators()
    assert source.startswith("mirror")
    for n, per_node in ((8, 8), (16, 8), (4, 4)):
        for offload in (False, True):
            assert my2(student.params, per_node, n // per_node, offload) == ds2(
                student.params, per_node, n // per_node, offload
            )
            for offload_params in (False, True):
                for zero_init in (False, True):
                    args = (
                        student.params,
                        student.largest_layer,
                        per_node,
                        n // per_node,
                        offload,
                        offload_params,
                        zero_init,
                    )
                    assert my3(*args) == ds3(*args)


def test_activation_formula(student):
    tokens = 4096
    no_ckpt = plan.activation_bytes(student, None, 1, tokens, checkpointing=False)
    ckpt = plan.activation_bytes(student, None, 1, tokens, checkpointing=True)
    per_layer = 2 * (6 * 4096 + 2 * 256 + 4 * 13696)  # bytes per token per decoder layer
    kd = 2 * 4 * 4 * 256 * 151552
    assert no_ckpt == pytest.approx(tokens * (40 * per_layer + 4 * 4096) + kd)
    assert ckpt == pytest.approx(tokens * (40 * 2 * 4096 + per_layer + 4 * 4096) + kd)
    assert plan.activation_bytes(student, None, 2, tokens, False) == pytest.approx(2 * no_ckpt - kd)


def test_recommendation_for_8_and_16_gpus(student):
    teacher = plan.teacher_shape("glm4-9b")
    picks = {}
    for n in (8, 16):
        rows = plan.plan_rows(student, teacher, n, 8, 1, 4096, "bf16", "replicated")
        picks[n] = plan.recommend(rows, 80e9)
        assert picks[n] is not None and picks[n].total <= 0.9 * 80e9
        ddp = [r for r in rows if r.strategy == "ddp"]
        assert all(r.total > 80e9 for r in ddp)  # 16 B/param replicated never fits a 9B student
    assert (picks[8].strategy, picks[8].checkpointing) == ("deepspeed_zero2", True)
    # an int8 teacher halves the teacher's share
    bf16 = plan.teacher_bytes(teacher, "bf16", "replicated", 8)
    int8 = plan.teacher_bytes(teacher, "int8", "replicated", 8)
    assert bf16 == 2 * GLM4_9B and 0.5 * bf16 < int8 < 0.7 * bf16
    assert plan.teacher_bytes(teacher, "bf16", "sharded", 8) == bf16 / 8 + 2 * teacher.largest_layer


def test_cli_prints_the_table_in_seconds(capsys):
    start = time.monotonic()
    text = plan.main(["--gpus", "8", "16"])
    assert time.monotonic() - start < 60
    assert "9,399,951,360" in text and "| 16 | deepspeed_zero3 |" in text
    assert "trainer=deepspeed_zero2" in text and "trainer.num_nodes=2" in text
    assert capsys.readouterr().out.strip() == text.strip()


def test_a_sharded_teacher_is_a_zero3_option_only(student):
    """``--teacher-placement sharded`` is ``teacher.shard=true``: ZeRO-3 rows shard it, the others keep it whole."""
    teacher = plan.teacher_shape("glm4-9b")
    rows = {r.strategy: r for r in plan.plan_rows(student, teacher, 8, 8, 1, 4096, "bf16", "sharded")}
    assert rows["ddp"].teacher == rows["fsdp"].teacher == 2.0 * teacher.params and not rows["ddp"].teacher_sharded
    assert rows["deepspeed_zero3"].teacher == 2.0 * teacher.params / 8 + 2.0 * teacher.largest_layer
    assert rows["deepspeed_zero3"].teacher_sharded and rows["deepspeed_zero3_offload"].teacher_sharded
    with pytest.raises(ValueError, match="cannot be int8"):
        plan.teacher_bytes(teacher, "int8", "sharded", 8)
