"""Choosing the next token: greedy or temperature/top-p sampling, penalties, logit bias, logprobs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """One choice's decoding settings (OpenAI request fields, already validated)."""

    max_tokens: int
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (fixed-length benchmarks)."""
    logprobs: int | None = None
    """None: no logprobs; k >= 0: each generated token's logprob plus the k most likely alternatives."""
    prompt_logprobs: int | None = None
    """Same for the prompt's tokens (``echo`` in ``/v1/completions``)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (before temperature/penalties) and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_k: int) -> list[TokenLogprob]:
    """``logits`` [T, V] and the token chosen at each row [T] → one :class:`TokenLogprob` per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, token_ids[:, None])[:, 0].tolist()
    if top_k > 0:
        values, indices = logp.topk(top_k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids.tolist(), chosen, tops, strict=True)]


class Sampler:
    """Picks tokens for one choice; holds its random generator and the counts penalties need.

    Args:
        params: the choice's settings.
        vocab_limit: rows at or beyond this id (a padded vocabulary's unused rows) are never chosen.
    """

    def __init__(self, params: SamplingParams, vocab_limit: int) -> None:
        self.params = params
        self.vocab_limit = vocab_limit
        self.counts: Counter[int] = Counter()
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the scores and no logprobs: the argmax over the real vocabulary."""
        p = self.params
        return (
            p.temperature < GREEDY_BELOW
            and p.logprobs is None
            and not p.logit_bias
            and not (p.presence_penalty or p.frequency_penalty)
        )

    def __call__(self, logits: torch.Tensor, argmax: int | None = None) -> tuple[int, TokenLogprob | None]:
        """``logits`` [V] of the next position → (token id, its logprob record when asked for).

        ``argmax``: the argmax over the real vocabulary when the caller took it for a whole batch at once; used
        only when this choice is :attr:`plain_greedy` (it is then the token).
        """
        if argmax is not None and self.plain_greedy:
            self.counts[argmax] += 1
            return argmax, None
        logits = logits.float().cpu()
        if logits.shape[-1] > self.vocab_limit:
            logits[self.vocab_limit :] = float("-inf")
        scores = self._adjusted(logits)
        p = self.params
        if p.temperature < GREEDY_BELOW:
            token = int(scores.argmax())
        else:
            probs = torch.softmax(scores / p.temperature, dim=-1)
            if p.top_p < 1.0:
                probs = _top_p(probs, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] += 1
        record = None
        if p.logprobs is not None:
            record = token_logprobs(logits[None], torch.tensor([token]), p.logprobs)[0]
        return token, record

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if not (p.logit_bias or (self.counts and (p.presence_penalty or p.frequency_penalty))):
            return logits
        scores = logits.clone()
        for token, bias in p.logit_bias.items():
            if token < scores.shape[-1]:
                scores[token] += bias
        if self.counts:
            ids = torch.tensor(list(self.counts))
            seen = torch.tensor(list(self.counts.values()), dtype=scores.dtype)
            scores[ids] -= p.frequency_penalty * seen + p.presence_penalty
        return scores


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches ``top_p`` (the top one always stays)."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
