"""Plugin selection by exact name: ``conf/plugin/<name>.yaml`` is the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoglm_train.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PLUGIN_CONF_DIR = CONF_DIR / "plugin"
NO_PLUGIN = "none"


class UnknownPluginError(ConfigError, KeyError):
    """A plugin name with no yaml in conf/plugin/."""

    def __str__(self) -> str:
        return str(self.args[0])


def available_plugins(conf_dir: Path = PLUGIN_CONF_DIR) -> list[str]:
    """Names of every plugin config shipped in ``conf/plugin`` (``none`` excluded)."""
    return sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem != NO_PLUGIN)


def plugin_config(name: str, conf_dir: Path = PLUGIN_CONF_DIR, **overrides: Any):
    """The composed yaml of plugin ``name``; exact names only, unknown ones list the choices."""
    from omegaconf import OmegaConf

    path = conf_dir / f"{name}.yaml"
    if name == NO_PLUGIN or not path.is_file():
        raise UnknownPluginError(f"unknown plugin '{name}'; available: {', '.join(available_plugins(conf_dir))}")
    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def instantiate_plugin(cfg: Any):
    """Build a plugin from its config (``_target_`` + constructor arguments)."""
    from hydra.utils import instantiate

    from autoglm_train.model.plugin import ModalityPlugin

    plugin = instantiate(cfg, _convert_="all")
    if not isinstance(plugin, ModalityPlugin):
        raise TypeError(f"{cfg.get('_target_')} is not a ModalityPlugin")
    return plugin
