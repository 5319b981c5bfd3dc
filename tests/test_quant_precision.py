"""The precision matrix: what runs on CPU, and one clear line for what cannot (never a silent NaN)."""

from __future__ import annotations

import re

import pytest

from autoglm_train.tasks.precision import PrecisionError, check_precision


@pytest.mark.parametrize("precision", ["32", "32-true", "bf16-mixed", "bf16-true", "bf16", "64-true", 32])
def test_cpu_accepts(precision):
    assert check_precision(precision, "cpu")


@pytest.mark.parametrize(
    ("precision", "why"),
    [
        ("16-mixed", "silently runs it as bf16"),
        ("16", "silently runs it as bf16"),
        ("16-true", "NaN"),
        ("transformer-engine", "NVIDIA GPU"),
    ],
)
def test_cpu_refuses_fp16_with_the_reason_and_the_alternatives(precision, why):
    with pytest.raises(PrecisionError, match=re.escape(f"trainer.precision={precision} cannot run on CPU")) as err:
        check_precision(precision, "cpu")
    assert why in str(err.value) and "bf16-mixed" in str(err.value)


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(PrecisionError, match=r"not a Lightning precision.*16-mixed"):
        check_precision("8-mixed", "cpu")


def test_gpu_rules():
    assert check_precision("16-mixed", "gpu", cuda_available=True, bf16_supported=False) == "16-mixed"
    assert check_precision("16", "gpu", cuda_available=True, bf16_supported=True) == "16-mixed"
    with pytest.raises(PrecisionError, match="no bf16; use 16-mixed"):
        check_precision("bf16-mixed", "gpu", cuda_available=True, bf16_supported=False)
    with pytest.raises(PrecisionError, match="no CUDA device"):
        check_precision("bf16-mixed", "gpu", cuda_available=False)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true", "16-mixed", "16-true"])
def test_precision_matrix_on_cpu_really_behaves_as_documented(precision, tmp_path):
    """Why the refusals exist: on CPU 16-mixed computes in bf16 and 16-true yields NaN; the rest train."""
    import lightning as L
    import torch

    from autoglm_train.model.decoder import build_decoder
    from tests.conftest import micro_spec

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = build_decoder(micro_spec(), 4096, 0, 1)
            self.losses, self.dtypes = [], set()
            self.model.lm_head.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))

        def training_step(self, batch, _):
            loss = self.model(input_ids=batch[0], labels=batch[0]).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    ids = torch.randint(0, 4096, (8, 16), generator=torch.Generator().manual_seed(6))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    module = Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    finite = all(torch.isfinite(torch.tensor(module.losses)))
    if precision == "16-true":
        assert not finite  # the silent NaN check_precision refuses up front
    else:
        assert finite, module.losses
    if precision == "16-mixed":
        assert torch.bfloat16 in module.dtypes and torch.float16 not in module.dtypes  # fp16 asked, bf16 ran
