"""benchmarks/RESULTS.md is built from sections, one per benchmark script; each run replaces its own."""

from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun it to refresh.\n"


def machine() -> str:
    import os

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(title: str, body: str, script: str | None = None) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md."""
    import inspect

    script = script or Path(inspect.stack()[1].filename).name
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"## {title}\n\n_{script}, {date.today().isoformat()}, {machine()}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


TRAIN_ONLY = (
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "recipe.checkpoint_every_n_steps=0",
    "recipe.sample_max_new_tokens=1",
    "logger=none",
)
"""``train.py`` overrides of a benchmark run that measures training alone: no validation, progress bar, checkpoints,
samples or logger to charge to its steps."""
