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

    data_cfg = run_config(run).data
    if str(data_cfg.get("_target_", "")).endswith("AssistantDataSpec"):
        run_data = data_cfg
        # an assistant run: its text corpus (data.text, Shakespeare by default) at the run's block length, the
        # held-out text the comparison has always scored (its conversations' answers need the teacher's cache)
        data_cfg = data_cfg.text.copy()
        data_cfg.seq_len, data_cfg.seed = run_data.seq_len, run_data.seed
    elif "source" not in data_cfg:
        raise ValueError(f"{run}: data={data_cfg.get('_target_')} has no held-out text to score (data=chat runs)")
    spec = instantiate(data_cfg, max_val_blocks=blocks, eval_batch_size=batch_size)
    data = TextDataModule(spec, tokenizer)
    data.setup("fit")
    return list(data.val_dataloader())
