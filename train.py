"""Entry point: ``python train.py recipe=<name> [overrides]``.

Only Hydra is imported before the config is composed, so a wrong override fails in a
second with Hydra's own message; the recipe (and torch) load afterwards. A config or input
the run cannot use ends it with one ``error: ...`` line and exit status 2 (no traceback).
"""

from __future__ import annotations

import importlib

import hydra
from omegaconf import DictConfig

from autoglm_train.errors import exit_on_config_error
from autoglm_train.utils.host_memory import keep_freed_host_memory


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    if cfg.get("keep_freed_host_memory", True):
        keep_freed_host_memory()
    with exit_on_config_error():
        recipe = importlib.import_module(cfg.recipe.module)
        recipe.run(cfg)


if __name__ == "__main__":
    main()
