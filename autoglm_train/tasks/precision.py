"""Which Lightning precisions can work on which hardware, checked before any heavy work.

On CPU, ``16-mixed`` is silently run as bf16 by torch autocast and ``16-true`` produces
NaNs; we refuse both with a line that says what to use instead.
"""

from __future__ import annotations

SUPPORTED = {
    "cpu": {"32", "32-true", "bf16-mixed", "bf16-true", "64", "64-true"},
    "gpu": {"32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64", "64-true"},
}


class PrecisionError(ValueError):
    """A precision that cannot work on the selected accelerator."""


def check_precision(
    precision: str | int, accelerator: str, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> str:
    """Normalised precision string, or a PrecisionError naming a working alternative."""
    import torch

    precision = str(precision)
    kind = "gpu" if accelerator in {"gpu", "cuda"} else "cpu" if accelerator == "cpu" else accelerator
    if kind == "gpu":
        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        if not cuda_available:
            raise PrecisionError(f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer=cpu")
        bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if precision.startswith("bf16") and not bf16:
            raise PrecisionError(f"trainer.precision={precision}: this GPU has no bf16; use 16-mixed")
    if kind in SUPPORTED and precision not in SUPPORTED[kind]:
        raise PrecisionError(
            f"trainer.precision={precision} cannot run on {kind.upper()} (fp16 there is either silently bf16 or NaN); "
            f"use one of {sorted(SUPPORTED[kind])}"
        )
    return precision
