"""Which Lightning precisions can work on which hardware, checked before any heavy work.

| precision    | CPU                                       | CUDA GPU                                  |
|--------------|-------------------------------------------|-------------------------------------------|
| `32`/`32-true` | yes (reference)                         | yes                                       |
| `bf16-mixed` | yes (autocast bf16, fp32 weights)         | yes where the GPU has bf16 (Ampere+)      |
| `bf16-true`  | yes (bf16 weights and optimizer states)   | yes where the GPU has bf16                |
| `16-mixed`   | refused: torch CPU autocast runs it as bf16 | yes (fp16 autocast + loss scaling)      |
| `16-true`    | refused: fp16 on CPU gives NaN losses     | yes (fp16 weights, no loss scaling: fragile) |
| `64`/`64-true` | yes (tests only)                        | yes (tests only)                          |

Lightning's aliases (``16`` → ``16-mixed``, ``bf16`` → ``bf16-mixed``, ``32``, ``64``) are read
first; anything Lightning does not know is refused with the list of valid values.
"""

from __future__ import annotations

from autoglm_train.errors import ConfigValueError

SUPPORTED = {
    "cpu": {"32", "32-true", "bf16-mixed", "bf16-true", "64", "64-true"},
    "gpu": {"32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64", "64-true"},
}
ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed"}
"""Lightning's shorthands whose meaning depends on the hardware check (``32``/``64`` are accepted as is)."""
LIGHTNING_PRECISIONS = set().union(*SUPPORTED.values()) | {"transformer-engine", "transformer-engine-float16"}
WHY_NOT_CPU = {
    "16-mixed": "torch CPU autocast silently runs it as bf16",
    "16-true": "fp16 arithmetic on CPU gives NaN losses",
    "transformer-engine": "Transformer Engine needs an NVIDIA GPU",
    "transformer-engine-float16": "Transformer Engine needs an NVIDIA GPU",
}


class PrecisionError(ConfigValueError):
    """A precision that cannot work on the selected accelerator."""


def check_precision(
    precision: str | int, accelerator: str, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> str:
    """Normalised precision string, or a PrecisionError naming a working alternative."""
    import torch

    given = str(precision)
    precision = ALIASES.get(given, given)
    if precision not in LIGHTNING_PRECISIONS:
        raise PrecisionError(
            f"trainer.precision={given} is not a Lightning precision; use one of {sorted(LIGHTNING_PRECISIONS)}"
        )
    kind = "gpu" if accelerator in {"gpu", "cuda"} else "cpu" if accelerator == "cpu" else accelerator
    if kind == "gpu":
        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        if not cuda_available:
            raise PrecisionError(f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer=cpu")
        bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if precision.startswith("bf16") and not bf16:
            raise PrecisionError(f"trainer.precision={given}: this GPU has no bf16; use 16-mixed")
    if kind in SUPPORTED and precision not in SUPPORTED[kind]:
        why = WHY_NOT_CPU.get(precision, "not supported there") if kind == "cpu" else "not supported there"
        raise PrecisionError(
            f"trainer.precision={given} cannot run on {kind.upper()} ({why}); use one of {sorted(SUPPORTED[kind])}"
        )
    return given if given in {"32", "64"} else precision
