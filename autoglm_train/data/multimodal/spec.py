"""The ``data_mm`` config: which pairs, how they are split and batched (``conf/data_mm/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoglm_train.data.multimodal.pairs import PairSource


@dataclass
class PairDataSpec:
    """Media → text pairs for training a plugin.

    Args:
        source: a :class:`~.pairs.PairSource` (built from the yaml's ``source._target_``).
        orders: the content orders of the user turn trained on: ``text_first`` (``[text, media]``, OpenAI's
            examples) and/or ``media_first``; the held-out evaluation uses the first. Every example is a chat
            conversation rendered by the decoder's serving chat template (``model/prompt_format.py``).
        enable_thinking: the template's thinking switch for the examples (off: the data carries no reasoning).
        media_at: ``answer`` (the placeholders right before the answer, where a small frozen decoder can be
            steered) or ``turn`` (where the client put them); recorded with the plugin, applied by the server.
        val_fraction: share of pairs for val/loss and val metrics during training.
        test_fraction: share held out for the final greedy-generation evaluation.
        batch_size: training batch size.
        eval_batch_size: val/test batch size (None = ``batch_size``).
        max_val_items: cap on the val split (val runs every ``val_check_interval`` steps).
        max_test_items: cap on the held-out split (None = all of it).
        preprocess_chunk: items per call of the plugin's ``preprocess`` while building the splits.
        strict: stop at the first bad item instead of skipping and counting it.
        seed: the split.
    """

    source: PairSource
    orders: tuple[str, ...] = ("text_first", "media_first")
    enable_thinking: bool = False
    media_at: str = "answer"
    val_fraction: float = 0.04
    test_fraction: float = 0.1
    batch_size: int = 32
    eval_batch_size: int | None = None
    max_val_items: int | None = 256
    max_test_items: int | None = None
    preprocess_chunk: int = 256
    strict: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not (
            0 <= self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                f"data_mm.val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must leave "
                "a non-empty training split (and test_fraction > 0: the held-out evaluation needs it)"
            )
        from autoglm_train.model.prompt_format import ORDERS

        self.orders = tuple(self.orders)
        if not self.orders or any(order not in ORDERS for order in self.orders):
            raise ValueError(f"data_mm.orders={list(self.orders)}: expected a non-empty list from {list(ORDERS)}")
        if self.batch_size < 1 or self.preprocess_chunk < 1:
            raise ValueError("data_mm.batch_size and data_mm.preprocess_chunk must be >= 1")
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size


def require_data(data_cfg: Any, plugin: str) -> Any:
    """``data_cfg``, or a clear error when the plugin has no embedded data and none was chosen."""
    if data_cfg is None:
        raise ValueError(
            f"plugin '{plugin}' has no embedded data (conf/data_mm/{plugin}.yaml); choose some: "
            "data_mm=mnist|digits|espeak, or your own: data_mm=local data_mm.source.path=<table> "
            "data_mm.source.modality=image|audio"
        )
    return data_cfg
