"""What the report reads: a run's CSV metrics and the JSON summaries the stages wrote. Nothing is recomputed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

Series = list[tuple[int, float]]


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's JSON, or None when the stage that writes it has not run."""
    return json.loads(path.read_text()) if path.is_file() else None


def metrics_files(run: Path) -> list[Path]:
    """``<run>/logs/version_*/metrics.csv`` in version order (a resumed run adds a version)."""
    return sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))


def read_metrics(run: Path) -> dict[str, Series]:
    """Every logged metric of ``run`` as ``(step, value)`` sorted by step; a later version wins on a step."""
    by_metric: dict[str, dict[int, float]] = {}
    for path in metrics_files(run):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for key, text in row.items():
                    if key in ("step", "epoch") or not text:
                        continue
                    value = float(text)
                    if math.isfinite(value):
                        by_metric.setdefault(key, {})[step] = value
    return {key: sorted(points.items()) for key, points in by_metric.items()}
