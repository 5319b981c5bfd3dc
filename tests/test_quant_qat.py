"""QAT: prepare → train a few steps → convert gives an int8 model matching the fake-quant one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.conftest import micro_spec


def _micro(vocab: int = 512, **overrides):
    from autoglm_train.model.decoder import build_decoder

    torch.manual_seed(0)
    return build_decoder(micro_spec(**overrides), vocab, 0, 1)


def _train(model, steps: int = 3) -> list[float]:
    torch.manual_seed(1)
    ids = torch.randint(0, 500, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _ids():
    return torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(2))


def test_prepare_keeps_parameters_state_dict_and_tying():
    from autoglm_train.quant.qat import QATSpec, prepare_qat

    model = _micro()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    counts = prepare_qat(model, QATSpec())
    assert counts == {"linear": 12, "head": 1, "embedding": 1}
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizer state stays valid
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # fake-quant adds no tensors and no tensor subclasses: the safetensors checkpoints stay as they were
    assert all(type(t) in (torch.Tensor, nn.Parameter) for t in model.state_dict(keep_vars=True).values())
    with pytest.raises(RuntimeError, match="already prepared"):
        prepare_qat(model, QATSpec())


def test_prepare_on_the_meta_device_keeps_keys_and_tying():
    """FSDP2's ranks > 0 build the student on meta and prepare it there; rank 0's weights arrive by key."""
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.quant.qat import QATSpec, prepare_qat

    with torch.device("meta"):
        model = build_decoder(micro_spec(), 512, 0, 1, device=None, dtype=None)
        prepare_qat(model, QATSpec())
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    whole = _micro()
    prepare_qat(whole, QATSpec())
    assert list(model.state_dict()) == list(whole.state_dict())


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only"])
def test_train_convert_then_ptq_matches_fake_quant(scheme):
    from torchao.quantization import Int8Tensor

    from autoglm_train.quant.int8_modules import Int8Embedding
    from autoglm_train.quant.ptq import PTQSpec, quantize_model
    from autoglm_train.quant.qat import QATSpec, convert_qat, prepare_qat

    model = _micro()
    prepare_qat(model, QATSpec(scheme=scheme))
    losses = _train(model)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    ids = _ids()
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    convert_qat(model)
    assert not any("FakeQuant" in type(m).__name__ for m in model.modules())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
    assert (float_logits - fake).abs().max() > 1e-5  # fake-quant did change the numbers

    quantize_model(model, PTQSpec(scheme=scheme))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 13 and all(isinstance(m.weight, Int8Tensor) for m in linears)
    assert all(m.weight.qdata.dtype == torch.int8 for m in linears)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    with torch.no_grad():
        int8 = model(input_ids=ids).logits
    torch.testing.assert_close(int8, fake, rtol=0, atol=1e-4)


def test_fake_quant_can_be_switched_off():
    from autoglm_train.quant.qat import QATSpec, prepare_qat, set_fake_quant

    model = _micro().eval()
    reference = copy.deepcopy(model)
    prepare_qat(model, QATSpec())
    ids = _ids()
    with torch.no_grad():
        on = model(input_ids=ids).logits
        set_fake_quant(model, False)
        off = model(input_ids=ids).logits
        ref = reference(input_ids=ids).logits
    torch.testing.assert_close(off, ref, rtol=0, atol=0)
    assert (on - ref).abs().max() > 1e-6


def test_vocab_head_is_fake_quantized_once_per_forward_under_chunked_kd():
    """The chunked KD loss calls the head per chunk (and again in backward); the [V, H] fake-quant runs once."""
    from autoglm_train.distill.kd_loss import KDLoss
    from autoglm_train.quant.qat import QATSpec, prepare_qat
    from autoglm_train.tasks.distill_task import split_lm

    student, teacher = _micro(), _micro(num_hidden_layers=1).eval().requires_grad_(False)
    prepare_qat(student, QATSpec())
    inner = student.get_output_embeddings().weight_fake_quantizer.quantizer
    calls = []
    inner.register_forward_hook(lambda *a: calls.append(1))
    batch = {"input_ids": _ids(), "labels": _ids()}
    backbone, head = split_lm(student)
    t_backbone, t_head = split_lm(teacher)
    hidden = backbone(input_ids=batch["input_ids"]).last_hidden_state
    t_hidden = t_backbone(input_ids=batch["input_ids"]).last_hidden_state
    out = KDLoss(chunk_size=4)(hidden, head, batch["labels"], teacher_hidden=t_hidden, teacher_head=t_head)
    out.loss.backward()
    assert len(calls) == 1  # 6 chunks, each run twice (forward + checkpoint recompute), one head fake-quant
    assert student.get_output_embeddings().weight.grad is not None


def test_qat_checkpoint_round_trip_through_safetensors_io(tmp_path):
    from autoglm_train.quant.qat import QATSpec, prepare_qat
    from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO

    model = _micro()
    prepare_qat(model, QATSpec())
    _train(model, steps=1)
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"state_dict": model.state_dict(), "global_step": 1}, tmp_path / "step.ckpt")
    fresh = _micro()
    prepare_qat(fresh, QATSpec())
    fresh.load_state_dict(io.load_checkpoint(tmp_path / "step.ckpt")["state_dict"])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_start_step_callback_follows_global_step():
    from types import SimpleNamespace

    from autoglm_train.quant.callback import QATStartCallback
    from autoglm_train.quant.qat import QATSpec, fake_quant_modules, prepare_qat

    model = _micro()
    prepare_qat(model, QATSpec(start_step=5))
    callback = QATStartCallback(5)
    callback.on_train_batch_start(SimpleNamespace(global_step=4), model, None, 0)
    assert not any(m.enabled for m in fake_quant_modules(model))
    callback.on_train_batch_start(SimpleNamespace(global_step=5), model, None, 0)
    assert all(m.enabled for m in fake_quant_modules(model))


def test_bad_specs_fail_with_the_key_name():
    from autoglm_train.quant.qat import QATSpec

    with pytest.raises(ValueError, match=r"quant\.qat\.scheme='int4'"):
        QATSpec(scheme="int4")
    with pytest.raises(ValueError, match=r"quant\.qat\.start_step"):
        QATSpec(start_step=-1)
