"""Decode tokens/s and prefill latency of causal LMs, measured the same way for every model compared.

Shared by ``benchmarks/quant_bench.py`` and the pipeline's teacher/student/int8 comparison, so
their tokens/s columns mean the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def decode_tps(model: nn.Module, prompt: Tensor, new_tokens: int, pad: int) -> float:
    """Greedy tokens per second after ``prompt`` (``generate`` with its KV cache, batch 1)."""
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return new_tokens / (time.perf_counter() - start)


def prefill_ms(model: nn.Module, prompt: Tensor) -> float:
    """Milliseconds from a whole prompt to its first next-token logits."""
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - start) * 1000


@torch.no_grad()
def speeds(
    models: Mapping[str, nn.Module],
    decode_prompt: Tensor,
    prefill_prompt: Tensor,
    new_tokens: int,
    repeats: int,
    pad: int,
) -> dict[str, dict[str, float]]:
    """Best of ``repeats`` per model, the models interleaved so a noisy neighbour hits them all alike."""
    for m in models.values():  # warm-up
        decode_tps(m, decode_prompt, 2, pad)
        prefill_ms(m, prefill_prompt)
    best = {name: {"decode_tps": 0.0, "prefill_ms": float("inf")} for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            best[name]["decode_tps"] = max(best[name]["decode_tps"], decode_tps(m, decode_prompt, new_tokens, pad))
            best[name]["prefill_ms"] = min(best[name]["prefill_ms"], prefill_ms(m, prefill_prompt))
    return best
