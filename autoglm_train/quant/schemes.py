"""The int8 schemes by name: one torchao PTQ config per scheme and the fake-quant that simulates it.

QAT and PTQ read the same table, so the numbers a student learns under fake-quant are the numbers
the converted model computes: symmetric per-row int8 weights (scale = max|row| / 127.5, range
[-128, 127]) and, for ``int8_dynamic``, asymmetric per-token int8 activations computed at run time.
The vocab head and the input embedding are always weight-only int8 (one int8 matrix when tied).
"""

from __future__ import annotations

from typing import Any

SCHEMES = ("int8_weight_only", "int8_dynamic")
"""``int8_weight_only``: int8 weights, float activations; ``int8_dynamic``: + per-token int8 activations."""

INSTALL_HINT = "pip install 'autoglm-train[quant]'  (torchao)"


def check_scheme(scheme: str, where: str = "quant scheme") -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"{where}={scheme!r}; expected one of {list(SCHEMES)}")
    return scheme


def torchao_quantization():
    """``torchao.quantization``, or an ImportError that says what to install."""
    try:
        import torchao.quantization as tq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"int8 quantization needs torchao: {INSTALL_HINT}") from err
    return tq


def ptq_config(scheme: str) -> Any:
    """The torchao config that quantizes a decoder block's linear layers for ``scheme``."""
    tq = torchao_quantization()
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quant_primitives import MappingType

    check_scheme(scheme)
    if scheme == "int8_weight_only":
        return tq.Int8WeightOnlyConfig(granularity=PerRow())
    # Asymmetric activations: the only per-token int8 that torchao's QAT can fake-quantize, so QAT matches PTQ.
    return tq.Int8DynamicActivationInt8WeightConfig(granularity=PerRow(), act_mapping_type=MappingType.ASYMMETRIC)


def head_ptq_config() -> Any:
    """Weight-only per-row int8, for the vocab head (and the tied embedding it shares a matrix with)."""
    return ptq_config("int8_weight_only")


def weight_fake_quant_config() -> Any:
    """Fake-quant of int8 symmetric per-row weights (the same qparams as torchao's ``Int8Tensor``)."""
    torchao_quantization()
    import torch
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, granularity=PerAxis(0), is_symmetric=True)


def activation_fake_quant_config(scheme: str) -> Any:
    """Fake-quant of the linear inputs: per-token asymmetric int8 for ``int8_dynamic``, None otherwise."""
    check_scheme(scheme)
    if scheme == "int8_weight_only":
        return None
    torchao_quantization()
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
