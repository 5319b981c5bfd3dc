"""How many bytes a model's weights take in memory, int8 tensor subclasses included."""

from __future__ import annotations

from torch import Tensor, nn


def _leaves(t: Tensor) -> list[Tensor]:
    """The plain tensors holding ``t``'s data (a torchao subclass keeps int8 data + scales inside)."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    out: list[Tensor] = []
    for name in names:
        inner = getattr(t, name)
        if inner is not None:
            out.extend(_leaves(inner))
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the ``state_dict`` tensors (parameters + persistent buffers), each storage counted once.

    Tied weights count once; an int8 tensor counts its int8 data plus its scales.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        for leaf in _leaves(t):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset())
            if leaf.numel() == 0 or key in seen:
                continue
            seen.add(key)
            total += leaf.numel() * leaf.element_size()
    return total
