"""Cut the right padding off a batch: conversation rows are padded to ``seq_len``, most are far shorter.

A batch of chat rows padded to 128 tokens whose longest row has 70 spends 45% of the decoder's forward and backward on
padding (the loss already skips it). Every ``[B, T, ...]`` tensor is cut to the longest row; a batch that is not right
padded (packed text: a mask of ones, or no mask) is returned as is.
"""

from __future__ import annotations

import torch


def trim_right_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with its ``[B, T, ...]`` tensors cut to the longest row of ``attention_mask``."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    width = mask.shape[1]
    lengths = mask.sum(dim=1)
    longest = int(lengths.max()) if lengths.numel() else width
    if longest >= width or not bool((mask.cumprod(dim=1).sum(dim=1) == lengths).all()):
        return batch  # nothing to cut, or not right padded (a hole or left padding): leave it
    return {
        key: value[:, :longest] if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == width else value
        for key, value in batch.items()
    }
