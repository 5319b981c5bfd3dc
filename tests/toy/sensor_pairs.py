"""Pairs for the toy sensor plugin: an 8-number reading → the direction it points ("north", "east", ...)."""

from __future__ import annotations

import numpy as np

from autoglm_train.data.multimodal.pairs import Pair
from autoglm_train.data.multimodal.report import SkipReport

DIRECTIONS = ("north", "east", "south", "west")
QUESTION = "Which way does the phone point?"


class SensorPairs:
    """Seeded readings: the direction's two channels are high, the rest small noise.

    Args:
        items: how many pairs.
        seed: the draw.
    """

    modality = "sensor"

    def __init__(self, items: int = 120, seed: int = 0) -> None:
        self.items, self.seed = items, seed

    def load(self, report: SkipReport) -> list[Pair]:
        rng = np.random.default_rng(self.seed)
        pairs = []
        for i in range(self.items):
            k = int(rng.integers(len(DIRECTIONS)))
            reading = rng.normal(0.0, 0.1, 8)
            reading[2 * k : 2 * k + 2] += 1.0
            report.seen += 1
            pairs.append(Pair(reading.round(4).tolist(), QUESTION, DIRECTIONS[k], where=f"reading {i}"))
        return pairs
