"""The Throughput callback: model FLOPs that match torch's own count, and the summary a distill run writes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import micro_spec
from tests.test_distill_recipe import _compose, _corpus, _overrides


def test_step_flops_equal_torchs_count_of_a_real_step():
    """Student forward + backward and teacher forward, counted by torch's FlopCounterMode, equal the formula."""
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.tasks.throughput import distill_step_flops

    student = build_decoder(micro_spec(), 128, 0)
    teacher = build_decoder(micro_spec(hidden_size=48, num_hidden_layers=3, tie_word_embeddings=False), 128, 0)
    for model in (student, teacher):  # torch counts attention's matmuls; its fused CPU SDPA kernel it does not
        model.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (2, 24))
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher(input_ids=ids)
        student(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == distill_step_flops(student, teacher, 2, 24)
    with FlopCounterMode(display=False) as counter:
        student(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == distill_step_flops(student, None, 2, 24)  # a top-k cache: no teacher


def test_distill_run_writes_its_throughput(tmp_path):
    from recipes.distill import run

    callback = "+callbacks=[{_target_: autoglm_train.tasks.throughput.Throughput, warmup_steps: 2, peak_tflops: 0.5}]"
    cfg = _compose([*_overrides(tmp_path, _corpus(tmp_path), steps=6), callback])
    run(cfg)
    result = json.loads((tmp_path / "outputs" / "t" / "throughput.json").read_text())
    assert result["timed_steps"] == 4 and result["world_size"] == 1 and result["device"].startswith("cpu")
    assert result["tokens_per_step_per_device"] == 2 * 32  # data.batch_size x data.seq_len
    assert result["tokens_per_s_per_device"] == pytest.approx(64 / result["step_seconds_median"])
    assert 0 < result["model_tflops_per_device"] < 0.5
    assert result["mfu"] == pytest.approx(result["model_tflops_per_device"] / 0.5)


def test_too_few_steps_for_the_warmup_say_so():
    from autoglm_train.tasks.throughput import Throughput

    callback = Throughput(warmup_steps=3)
    callback.steps = [{"seconds": 1.0, "tokens": 8.0}] * 3
    with pytest.raises(ValueError, match="3 steps ran, all inside warmup_steps=3"):
        callback.summary(trainer=None)
    with pytest.raises(ValueError, match="peak_tflops=0"):
        Throughput(peak_tflops=0)
