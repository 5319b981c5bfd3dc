"""Text data for distillation: embedded corpora, a robust reader, packing, and a resumable DataModule.

Names are imported lazily so that reading or building a corpus does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoglm_train.data.build import PackedText, build_packed
    from autoglm_train.data.corpora import BUILTIN_CORPORA, build_corpus
    from autoglm_train.data.datamodule import TextDataModule
    from autoglm_train.data.loader import ResumableLoader
    from autoglm_train.data.reader import ReadReport, ReadResult, read_source
    from autoglm_train.data.spec import TextDataSpec

_EXPORTS = {
    "BUILTIN_CORPORA": "corpora",
    "build_corpus": "corpora",
    "ReadReport": "reader",
    "ReadResult": "reader",
    "read_source": "reader",
    "TextDataSpec": "spec",
    "PackedText": "build",
    "build_packed": "build",
    "ResumableLoader": "loader",
    "TextDataModule": "datamodule",
}
__all__ = [
    "BUILTIN_CORPORA",
    "PackedText",
    "ReadReport",
    "ReadResult",
    "ResumableLoader",
    "TextDataModule",
    "TextDataSpec",
    "build_corpus",
    "build_packed",
    "read_source",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
