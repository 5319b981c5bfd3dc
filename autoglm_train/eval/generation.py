"""Held-out evaluation of a plugin through the serving engine, and the text-only parity check.

Answers come from :class:`~autoglm_train.engine.engine.Engine` — the loop the server runs — on
prompts rendered by the plugin's :class:`~autoglm_train.model.prompt_format.PromptFormat`, so a
held-out score here is the score a client gets through ``/v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from autoglm_train.engine.engine import Engine, Prompt
from autoglm_train.engine.sampling import SamplingParams
from autoglm_train.eval.text_metrics import cer, digit_accuracy, exact_match, wer


def greedy(max_new_tokens: int, logprobs: bool = False) -> SamplingParams:
    """What the evaluation and the served evaluation ask for: temperature 0, a fixed budget."""
    return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=0 if logprobs else None)


def batch_prompts(batch: dict[str, Any], plugin: str) -> list[Prompt]:
    """A collated batch's left-padded prompts → one :class:`Prompt` per row with its own media item."""
    prompts = []
    for row, (ids, mask) in enumerate(zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)):
        media = batch["media"][row : row + 1]
        prompts.append(Prompt(ids=ids[mask.bool()].tolist(), inputs={plugin: media}))
    return prompts


@torch.no_grad()
def generate_answers(engine: Engine, batch: dict[str, Any], plugin: str, max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch's prompts, decoded together by the engine."""
    return answer_texts(engine, engine.generate(batch_prompts(batch, plugin), greedy(max_new_tokens)))


def answer_texts(engine: Engine, tokens: list[list[int]]) -> list[str]:
    """Generated ids → the answer text a chat client reads (special tokens dropped, stripped)."""
    return [text.strip() for text in engine.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def score(answers: list[str], outputs: list[str], digit_labels: list[str | None]) -> dict[str, float]:
    """accuracy (exact match), WER, CER and, where every item has a digit label, digit accuracy."""
    metrics = {"accuracy": exact_match(answers, outputs), "wer": wer(answers, outputs), "cer": cer(answers, outputs)}
    if digit_labels and all(label is not None for label in digit_labels):
        metrics["digit_accuracy"] = digit_accuracy(digit_labels, outputs)
    return metrics


@torch.no_grad()
def mean_gate(engine: Engine, plugin: str, media: torch.Tensor) -> torch.Tensor:
    """The plugin's gate for each item of ``media`` (the value it blends its features with)."""
    module = engine.model.plugin(plugin)
    return module.gate(module.encode(media.to(engine.device))).float().view(-1).cpu()


def evaluate(
    engine: Engine, batches: Iterable[dict[str, Any]], plugin: str, max_new_tokens: int, num_samples: int = 8
) -> dict[str, Any]:
    """Greedy-generation metrics over ``batches``, every item's output (text and ids), and the mean gate."""
    answers, outputs, output_ids, output_logprobs, labels, gates = [], [], [], [], [], []
    for batch in batches:
        logprobs: list[list[float]] = []
        tokens = engine.generate(batch_prompts(batch, plugin), greedy(max_new_tokens, logprobs=True), logprobs)
        output_ids += tokens
        output_logprobs += logprobs
        outputs += answer_texts(engine, tokens)
        answers += batch["answers"]
        labels += batch["digit_labels"]
        gates.append(mean_gate(engine, plugin, batch["media"]))
    if not answers:
        raise ValueError("evaluate: no held-out items")
    return {
        **score(answers, outputs, labels),
        "items": len(answers),
        f"gate_{plugin}": float(torch.cat(gates).mean()),
        "samples": [{"reference": a, "output": o} for a, o in zip(answers[:num_samples], outputs, strict=False)],
        "outputs": outputs,
        "output_ids": output_ids,
        "output_logprobs": output_logprobs,
    }


@torch.no_grad()
def text_only_tokens(engine: Engine, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens for raw text prompts through the engine (every built plugin's fusion on the path)."""
    encoded = [Prompt(ids=engine.encode(text, add_special_tokens=False)) for text in prompts]
    return engine.generate(encoded, greedy(max_new_tokens))


@torch.no_grad()
def bare_decoder_tokens(decoder, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The bare HF decoder's greedy tokens (transformers' own ``generate``): the reference the engine must equal."""
    device = decoder.get_input_embeddings().weight.device
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        new = decoder.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.append(new[0, ids.shape[1] :].tolist())
    return out
