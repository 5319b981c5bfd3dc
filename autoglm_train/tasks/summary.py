"""The run summary JSON: what a run produced, in one file scripts and reports can read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` atomically; tensors and numpy scalars become plain numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path
