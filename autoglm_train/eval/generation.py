"""Greedy generation through a ModularLM and the metrics of what it says: the held-out evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from autoglm_train.eval.text_metrics import cer, digit_accuracy, exact_match, wer


@torch.no_grad()
def generate_answers(model, batch: dict[str, Any], plugin: str, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch's left-padded prompts, with the batch's media fused by ``plugin``."""
    was_training = model.training
    model.eval()
    new = model.generate(
        batch["prompt_ids"],
        attention_mask=batch["prompt_mask"],
        modality_inputs={plugin: batch["media"]},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def score(answers: list[str], outputs: list[str], digit_labels: list[str | None]) -> dict[str, float]:
    """accuracy (exact match), WER, CER and, where every item has a digit label, digit accuracy."""
    metrics = {"accuracy": exact_match(answers, outputs), "wer": wer(answers, outputs), "cer": cer(answers, outputs)}
    if digit_labels and all(label is not None for label in digit_labels):
        metrics["digit_accuracy"] = digit_accuracy(digit_labels, outputs)
    return metrics


def evaluate(
    model, batches: Iterable[dict[str, Any]], plugin: str, tokenizer, max_new_tokens: int, num_samples: int = 8
) -> dict[str, Any]:
    """Greedy-generation metrics over ``batches`` plus a few (reference, output) samples and the mean gate."""
    device = model.decoder.get_input_embeddings().weight.device
    answers, outputs, labels, gates = [], [], [], []
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        outputs += generate_answers(model, batch, plugin, tokenizer, max_new_tokens)
        answers += batch["answers"]
        labels += batch["digit_labels"]
        gates.append(model.last_gates[plugin].float().cpu())
    if not answers:
        raise ValueError("evaluate: no held-out items")
    gate = torch.cat(gates)
    return {
        **score(answers, outputs, labels),
        "items": len(answers),
        f"gate_{plugin}": float(gate.mean()),
        "samples": [{"reference": a, "output": o} for a, o in zip(answers[:num_samples], outputs, strict=False)],
    }


@torch.no_grad()
def text_only_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens for text prompts (no media), one prompt at a time: the text-only parity evidence.

    ``model`` is a ModularLM (plugins attached or not) or the bare HF decoder.
    """
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append((new if hasattr(model, "plugins") else new[:, ids.shape[1] :])[0].tolist())
    return out
