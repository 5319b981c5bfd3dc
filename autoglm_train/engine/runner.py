"""The engine's forward passes: prefill one prompt (plugins fused), decode one step of the whole batch, score
text prompts together (no cache).

The scheduler calls these under the engine's lock. Logits come from the decoder body plus the engine's
vocabulary head (:mod:`.head`), never from the decoder's own forward, so every caller of the engine
(held-out evaluation, the server) gets the same numbers, to the last bit.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from autoglm_train.engine.head import body_of, vocab_head
from autoglm_train.engine.prompt_logprobs import batched_logits
from autoglm_train.engine.scheduler import Prompt
from autoglm_train.model.modular import ModularLM


class ModelRunner:
    """Forward passes over ``model`` (decoder + plugins) with a transformers KV cache.

    Args:
        model: the decoder with its plugins.
        device: where inputs go (the input embeddings' device).
    """

    def __init__(self, model: ModularLM, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._body, self._head = body_of(model.decoder), vocab_head(model.decoder)
        params = inspect.signature(self._body.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def prefill(self, prompt: Prompt, all_logits: bool) -> tuple[torch.Tensor, Any]:
        """One prompt through the decoder: every attached plugin's fusion, then the decoder with a fresh cache."""
        ids = torch.tensor([prompt.ids], device=self.device)
        embeds = self.model.embed(ids, prompt.inputs)
        out = self._body(inputs_embeds=embeds, use_cache=True)
        hidden = out.last_hidden_state
        return self._head(hidden if all_logits else hidden[:, -1:]), _cache_of(out)

    def score(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        """Text prompts' logits [T_i, V] each, batched, no cache (:mod:`.prompt_logprobs`)."""
        return batched_logits(self._body, self._head, [prompt.ids for prompt in prompts], self.device)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any):
        """One token for every running row (left-padded ``mask``, per-row ``positions``)."""
        out = self._body(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache}
        )
        return self._head(out.last_hidden_state), _cache_of(out)

    @staticmethod
    def new_cache() -> Any:
        from transformers import DynamicCache

        return DynamicCache()


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
