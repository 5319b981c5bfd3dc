"""Prompt log-probs of many prompts in one forward pass: what a teacher server spends its time on.

A distillation teacher is asked for the top-k at every position of a block and after its last token
(``echo`` + ``logprobs=k`` + ``max_tokens`` 0 or 1, see :mod:`autoglm_train.distill.teacher_client`). Such a request
needs no KV cache and no decode step, so the generation loop hands every one admitted in the same step here and
they run as one batch instead of one prefill each: right-padded when lengths differ (a causal model's logits at a
real position never see the padding after it), at most :data:`MAX_BATCH_TOKENS` padded tokens per forward so the
``[B, T, V]`` logits stay bounded. Log-softmax in float32, then the top-k, by the function that also scores sampled
tokens (:func:`~.sampling.token_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autoglm_train.engine.sampling import TokenLogprob, token_logprobs

MAX_BATCH_TOKENS = 8192
"""Padded tokens per forward pass (a 49k vocabulary: 1.6 GB of float32 logits at most)."""


@dataclass
class PromptScores:
    """Logprobs of the prompt's own tokens (the first has none: nothing precedes it)."""

    logprobs: list[TokenLogprob | None]


def prompt_scores(logits: Tensor, ids: list[int], top_k: int, vocab_limit: int | None = None) -> PromptScores:
    """``logits`` [T, V] at a prompt's T positions → each prompt token's log-prob and its ``top_k`` alternatives.

    Normalised over the first ``vocab_limit`` columns (a padded vocabulary's unused rows are no tokens), as the
    sampler scores generated tokens and as vLLM and the in-process top-k cache do.
    """
    if len(ids) < 2:
        return PromptScores([None] * len(ids))
    following = torch.tensor(ids[1:], device=logits.device)
    return PromptScores([None, *token_logprobs(logits[:-1, :vocab_limit].float(), following, top_k)])


def batched_logits(
    body: nn.Module, head: Callable[[Tensor], Tensor], prompts: list[list[int]], device: torch.device
) -> list[Tensor]:
    """Each prompt's logits ``[T_i, V]``, from as few forward passes of ``body`` + ``head`` as the bound allows."""
    out: list[Tensor] = []
    for group in _groups(prompts):
        width = max(len(ids) for ids in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(group):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
        padded = any(len(prompt) < width for prompt in group)
        extra = {"attention_mask": mask.to(device)} if padded else {}
        logits = head(body(input_ids=ids.to(device), use_cache=False, **extra).last_hidden_state)
        out += [logits[row, : len(prompt)] for row, prompt in enumerate(group)]
    return out


def _groups(prompts: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive prompts whose padded batch stays within :data:`MAX_BATCH_TOKENS` (a longer one runs alone)."""
    groups: list[list[list[int]]] = []
    width = 0
    for prompt in prompts:
        if groups and (len(groups[-1]) + 1) * max(width, len(prompt)) <= MAX_BATCH_TOKENS:
            groups[-1].append(prompt)
            width = max(width, len(prompt))
        else:
            groups.append([prompt])
            width = len(prompt)
    return groups
