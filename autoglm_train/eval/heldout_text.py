"""The held-out text of a ``recipe=distill`` run: its own validation split, rebuilt from the run's saved config.

Comparisons after training (int8 vs float, teacher vs student) score exactly the text the run
validated on, without re-reading any training setting by hand.
"""

from __future__ import annotations

from pathlib import Path


def run_config(run: str | Path):
    """The composed config a run was started with (``<run>/hydra/config.yaml``)."""
    from omegaconf import OmegaConf

    path = Path(run) / "hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {run} is not a train.py run directory")
    return OmegaConf.load(path)


def val_batches(run: str | Path, tokenizer, blocks: int, batch_size: int = 4) -> list[dict]:
    """The first ``blocks`` validation blocks of ``run``'s text data, batched ``{"input_ids", "labels", ...}``."""
    from hydra.utils import instantiate

    from autoglm_train.data.datamodule import TextDataModule

    spec = instantiate(run_config(run).data, max_val_blocks=blocks, eval_batch_size=batch_size)
    data = TextDataModule(spec, tokenizer)
    data.setup("fit")
    return list(data.val_dataloader())
