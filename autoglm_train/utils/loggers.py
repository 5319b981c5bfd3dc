"""Logger factories for ``conf/logger`` that need a decision at run time."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def wandb_logger(project: str, name: str, save_dir: str, mode: str = "auto"):
    """W&B logger: online only when credentials exist, so a run never blocks on a login prompt."""
    from lightning.pytorch.loggers import WandbLogger

    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
        mode = "online" if has_key else "offline"
    if mode not in {"online", "offline", "disabled"}:
        raise ValueError(f"logger.mode={mode!r}; expected auto | online | offline | disabled")
    os.makedirs(save_dir, exist_ok=True)
    log.info("wandb logging %s (project %s, run %s)", mode, project, name)
    return WandbLogger(project=project, name=name, save_dir=save_dir, mode=mode)


def no_logger() -> bool:
    """``Trainer(logger=False)``."""
    return False
