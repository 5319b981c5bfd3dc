"""Fake-quant of the vocab head computed once per model forward and reused by every loss chunk.

The KD loss runs the head over chunks of positions inside ``torch.utils.checkpoint`` and again in
backward; a plain fake-quant linear would re-quantize the [V, H] head matrix (the largest in a
small student) every time: 16 times a step at the default chunking. Here the fake-quantized matrix
is computed once, by a pre-hook on the backbone (outside every checkpoint region, so autograd keeps
one graph for it), and the head and a tied input embedding both read it. A weight that changed
since (an optimizer step, ``load_state_dict``) is detected through its version counter and
re-quantized on the spot, so a stale value is never used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OncePerForwardFakeQuant(nn.Module):
    """Wraps a weight fake-quantizer so it runs once per backbone forward for ``source.weight``.

    Args:
        quantizer: the torchao weight fake-quantizer (``IntxFakeQuantizer``) doing the maths.
        source: the module owning the weight (the head; the tied embedding shares it).
    """

    def __init__(self, quantizer: nn.Module, source: nn.Module) -> None:
        super().__init__()
        self.quantizer = quantizer
        self._source = (source,)  # a tuple: not a submodule, so no second path to the weight in state_dict
        self._cache: tuple[int, int, bool, Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.quantizer, "enabled", True))

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.quantizer.enabled = value
        self._cache = None

    def _key(self, weight: Tensor) -> tuple[int, int, bool]:
        return id(weight), weight._version, torch.is_grad_enabled()

    def refresh(self) -> None:
        """Quantize the current weight now (called by the backbone pre-hook)."""
        weight = self._source[0].weight
        self._cache = (*self._key(weight), self.quantizer(weight))

    def clear(self) -> None:
        self._cache = None

    def forward(self, weight: Tensor) -> Tensor:
        cache = self._cache
        if cache is not None and cache[:3] == self._key(weight):
            return cache[3]
        return self.quantizer(weight)

    def __getstate__(self):  # deepcopy / pickle never carry a graph-attached cache
        state = self.__dict__.copy()
        state["_cache"] = None
        return state


def attach_refresh_hook(backbone: nn.Module, quantizers: list[OncePerForwardFakeQuant]):
    """Refresh ``quantizers`` at the start of every ``backbone`` forward; returns the hook handle."""

    def _pre_hook(_module, _args, _kwargs):
        for q in quantizers:
            if q.enabled:
                q.refresh()
            else:
                q.clear()

    return backbone.register_forward_pre_hook(_pre_hook, with_kwargs=True)
