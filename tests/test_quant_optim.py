"""quant=int8_optim (= optim=adamw8bit): bitsandbytes AdamW8bit trains on CPU and checkpoints without pickle."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, micro_spec


def _optimizer_partial(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["quant=int8_optim", f"paths.root_dir={tmp_path}"])
    assert cfg.optim.optimizer._target_ == "bitsandbytes.optim.AdamW8bit"
    return instantiate(cfg.optim.optimizer)


@pytest.mark.slow  # importing bitsandbytes alone takes 10-20 s on a loaded 2-core machine
def test_adamw8bit_trains_a_few_steps_with_int8_states(tmp_path):
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.utils.checkpoint_io import SafetensorsCheckpointIO

    torch.manual_seed(0)
    model = build_decoder(micro_spec(), 8192, 0, 1)
    optimizer = _optimizer_partial(tmp_path)(model.parameters())
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    embed_state = optimizer.state[model.get_input_embeddings().weight]
    assert embed_state["state1"].dtype == torch.uint8  # the 262k-element embedding's moments are 8-bit
    # the optimizer state is plain tensors: the safetensors CheckpointIO stores and restores it
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"optimizer_states": [optimizer.state_dict()]}, tmp_path / "opt.ckpt")
    restored = io.load_checkpoint(tmp_path / "opt.ckpt")["optimizer_states"][0]
    fresh = _optimizer_partial(tmp_path)(model.parameters())
    fresh.load_state_dict(restored)
    assert torch.equal(fresh.state[model.get_input_embeddings().weight]["state1"], embed_state["state1"])
