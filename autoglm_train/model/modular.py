"""The modular model: a GLM decoder with modality plugins that exist only once used."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from autoglm_train.model.plugin import ModalityPlugin

log = logging.getLogger(__name__)

PluginSource = Callable[[], ModalityPlugin]


class ModularLM(nn.Module):
    """Decoder + lazily built plugins.

    A text-only forward runs the decoder alone and never constructs an encoder. A plugin
    is built (and its weights read from its own folder) the first time a batch carries
    its modality, then kept as a submodule.

    Args:
        decoder: a transformers causal LM (``GlmForCausalLM``).
        placeholder_ids: placeholder token → id in the decoder's tokenizer.
    """

    def __init__(self, decoder: nn.Module, placeholder_ids: Mapping[str, int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.plugins = nn.ModuleDict()
        self.placeholder_ids = dict(placeholder_ids)
        self._sources: dict[str, PluginSource] = {}
        self.last_gates: dict[str, torch.Tensor] = {}

    # --- plugins ----------------------------------------------------------------------
    def register_plugin(self, name: str, source: PluginSource) -> None:
        """Make plugin ``name`` available without building it."""
        self._sources[name] = source

    def register_plugin_dir(self, directory: str | Path, fingerprint: str | None = None) -> str:
        """Register a saved plugin folder; its weights load on first use."""
        from autoglm_train.model.plugin_io import load_plugin, read_plugin_meta

        name = read_plugin_meta(directory)["name"]
        self.register_plugin(name, lambda: load_plugin(directory, fingerprint))
        return name

    def add_plugin(self, plugin: ModalityPlugin) -> ModalityPlugin:
        """Attach an already built plugin (e.g. a fresh one about to be trained)."""
        self._check_placeholder(plugin)
        self.plugins[plugin.name] = plugin
        return plugin

    @property
    def available_plugins(self) -> list[str]:
        return sorted({*self._sources, *self.plugins})

    def plugin(self, name: str) -> ModalityPlugin:
        """The plugin ``name``, built and loaded on first use."""
        if name in self.plugins:
            return self.plugins[name]
        if name not in self._sources:
            raise KeyError(f"no plugin '{name}' attached; attached: {self.available_plugins or 'none'}")
        plugin = self._sources[name]().train(self.training)  # a loaded plugin follows the model's mode (dropout)
        self._check_placeholder(plugin)
        device = self.decoder.get_input_embeddings().weight.device
        self.plugins[name] = plugin.to(device)
        log.info("plugin %s loaded on %s (%s params)", name, device, f"{sum(p.numel() for p in plugin.parameters()):,}")
        return plugin

    def _check_placeholder(self, plugin: ModalityPlugin) -> None:
        if plugin.placeholder not in self.placeholder_ids:
            raise ValueError(
                f"plugin {plugin.name}: placeholder '{plugin.placeholder}' is not a token of this decoder's "
                f"tokenizer; reserved: {sorted(self.placeholder_ids)}"
            )
        if plugin.hidden_size != self.decoder.config.hidden_size:
            raise ValueError(
                f"plugin {plugin.name}: projects to {plugin.hidden_size}, decoder hidden size is "
                f"{self.decoder.config.hidden_size}"
            )

    # --- forward ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, modality_inputs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Input embeddings through the fusion of every built plugin (with its media, or none).

        A built plugin fuses even a batch that carries none of its media: that is the path a served
        text request takes once the plugin is loaded, so a fusion that leaks into non-placeholder
        positions shows in text-only output (and the text-only parity check sees it).
        """
        modality_inputs = dict(modality_inputs or {})
        for name in modality_inputs:
            self.plugin(name)  # build on first use
        embeds = self.decoder.get_input_embeddings()(input_ids)
        self.last_gates = {}
        for name, plugin in self.plugins.items():
            inputs = modality_inputs.get(name)
            embeds, gates = plugin.fuse(embeds, input_ids, self.placeholder_ids[plugin.placeholder], inputs)
            if inputs is not None:
                self.last_gates[name] = gates.detach()
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        modality_inputs: Mapping[str, torch.Tensor] | None = None,
        **kwargs,
    ):
        """Decoder forward; plugins join only when ``modality_inputs`` names them."""
        if not modality_inputs:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds = self.embed(input_ids, modality_inputs)
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
