"""Measured importance of a teacher's layers, heads, FFN channels and hidden channels on a calibration batch.

A student initialised from the teacher keeps what these scores rank highest (Minitron, ShortGPT): dropping layers
evenly ignores that the first and last blocks of an LM do most of the work while some middle blocks are near
identities. Every score is "higher = more important".

* block influence (ShortGPT): ``1 - cos(h_in, h_out)`` of each block, averaged over tokens; a block that barely
  turns its input scores ~0;
* perplexity drop: the calibration NLL with the block removed minus the full model's NLL;
* activation importance (Minitron): mean ``|x|`` of each hidden channel after the RMSNorms, of each FFN channel at
  the input of ``down_proj``, and the mean L2 norm of each attention head's output at the input of ``o_proj``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = dict[str, Tensor]


@dataclass
class Importance:
    """Per-unit scores measured on the calibration batches (CPU float32)."""

    block_influence: Tensor
    """[L] 1 - mean cos(h_in, h_out) per decoder block."""
    hidden: Tensor
    """[L, H] mean |x| per hidden channel after each block's two RMSNorms (summed)."""
    final_hidden: Tensor
    """[H] mean |x| per hidden channel after the final norm."""
    ffn: Tensor
    """[L, I] mean |x| per FFN channel at the input of down_proj."""
    heads: Tensor
    """[L, n_heads] mean L2 norm of each head's attention output."""


def _layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, model.base_model_prefix).layers


def _first(x: object) -> Tensor:
    return x[0] if isinstance(x, tuple | list) else x  # decoder blocks return a tensor (transformers 5) or a tuple


@torch.no_grad()
def measure_importance(model: nn.Module, batches: Sequence[Batch]) -> Importance:
    """One pass of ``model`` over ``batches`` with hooks collecting every activation score."""
    layers = _layers(model)
    n_layers = len(layers)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    acc: dict[str, Tensor] = {
        "bi": torch.zeros(n_layers),
        "hidden": torch.zeros(n_layers, config.hidden_size),
        "final": torch.zeros(config.hidden_size),
        "ffn": torch.zeros(n_layers, config.intermediate_size),
        "heads": torch.zeros(n_layers, config.num_attention_heads),
    }
    handles = []

    def per_token(x: Tensor) -> Tensor:
        return x.detach().float().reshape(-1, x.shape[-1])

    for i, layer in enumerate(layers):

        def block(module, args, kwargs, out, i=i):
            h_in = per_token(args[0] if args else kwargs["hidden_states"])
            h_out = per_token(_first(out))
            acc["bi"][i] += (1.0 - F.cosine_similarity(h_in, h_out, dim=-1)).sum().cpu()

        def norm(module, args, out, i=i):
            acc["hidden"][i] += per_token(out).abs().sum(0).cpu()

        def down(module, args, i=i):
            acc["ffn"][i] += per_token(args[0]).abs().sum(0).cpu()

        def o_proj(module, args, i=i):
            x = per_token(args[0])
            acc["heads"][i] += x.view(x.shape[0], -1, head_dim).norm(dim=-1).sum(0).cpu()

        handles += [
            layer.register_forward_hook(block, with_kwargs=True),
            layer.input_layernorm.register_forward_hook(norm),
            layer.post_attention_layernorm.register_forward_hook(norm),
            layer.mlp.down_proj.register_forward_pre_hook(down),
            layer.self_attn.o_proj.register_forward_pre_hook(o_proj),
        ]
    backbone = getattr(model, model.base_model_prefix)

    def final_norm(module, args, out):
        acc["final"] += per_token(out).abs().sum(0).cpu()

    handles.append(backbone.norm.register_forward_hook(final_norm))
    tokens = 0
    try:
        for batch in batches:
            backbone(input_ids=batch["input_ids"].to(_device(model)), use_cache=False)
            tokens += batch["input_ids"].numel()
    finally:
        for h in handles:
            h.remove()
    n = max(tokens, 1)
    return Importance(
        block_influence=acc["bi"] / n,
        hidden=acc["hidden"] / n,
        final_hidden=acc["final"] / n,
        ffn=acc["ffn"] / n,
        heads=acc["heads"] / n,
    )


@torch.no_grad()
def calibration_nll(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean next-token NLL of ``model`` on ``batches`` (labels already shifted; -100 ignored)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(_device(model)), use_cache=False).logits.float()
        labels = batch["labels"].to(logits.device)
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def perplexity_drop(model: nn.Module, batches: Sequence[Batch]) -> Tensor:
    """[L] calibration NLL with each block removed alone, minus the full model's NLL."""
    base = calibration_nll(model, batches)
    n_layers = len(_layers(model))
    drops = torch.zeros(n_layers)
    for i in range(n_layers):
        with kept_layers(model, [j for j in range(n_layers) if j != i]):
            drops[i] = calibration_nll(model, batches) - base
    return drops


@contextmanager
def kept_layers(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with only the blocks ``keep`` (in order); the original blocks are back on exit."""
    backbone = getattr(model, model.base_model_prefix)
    original, count = backbone.layers, model.config.num_hidden_layers
    backbone.layers = nn.ModuleList([original[i] for i in keep])
    model.config.num_hidden_layers = len(keep)  # transformers 5 runs self.layers[: config.num_hidden_layers]
    try:
        yield
    finally:
        backbone.layers = original
        model.config.num_hidden_layers = count


def select_top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, in ascending index order (ties: the lower index wins)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` indices spread evenly, first and last included: the naive baseline."""
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} units")
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
