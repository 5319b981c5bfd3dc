"""Entry point: ``python train.py recipe=<name> [overrides]``.

Only Hydra is imported before the config is composed, so a wrong override fails in a
second with Hydra's own message; the recipe (and torch) load afterwards.
"""

from __future__ import annotations

import importlib

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    recipe = importlib.import_module(cfg.recipe.module)
    recipe.run(cfg)


if __name__ == "__main__":
    main()
