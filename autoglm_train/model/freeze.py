"""Freezing in one place, logged: what trains is a decision the log must show."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

log = logging.getLogger(__name__)


def freeze(components: Mapping[str, nn.Module], trainable: Mapping[str, bool]) -> dict[str, tuple[int, int]]:
    """Set ``requires_grad`` per named component and log trainable/total counts.

    Every component must get an explicit flag, so nothing trains by accident.
    Returns ``{name: (trainable params, total params)}``.
    """
    missing = set(components) - set(trainable)
    unknown = set(trainable) - set(components)
    if missing or unknown:
        raise ValueError(f"freeze: flags missing for {sorted(missing)}, unknown components {sorted(unknown)}")
    counts: dict[str, tuple[int, int]] = {}
    for name, module in components.items():
        module.requires_grad_(trainable[name])
        total = sum(p.numel() for p in module.parameters())
        counts[name] = (total if trainable[name] else 0, total)
    summary = ", ".join(f"{n}={'train' if trainable[n] else 'frozen'} ({t:,})" for n, (_, t) in counts.items())
    log.info(
        "freeze: %s | trainable %s of %s params",
        summary,
        f"{sum(c[0] for c in counts.values()):,}",
        f"{sum(c[1] for c in counts.values()):,}",
    )
    return counts
