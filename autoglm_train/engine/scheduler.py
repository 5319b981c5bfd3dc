"""The one generation loop: iteration-level (continuous) batching over a KV cache.

Every generation — a server request, each of its ``n`` choices, each prompt of a batched
``/v1/completions``, every item of ``recipe=add_modality``'s held-out evaluation — is a
:class:`Sequence` submitted here. One thread runs the loop:

1. admit waiting sequences: each is prefilled alone (token ids, or plugin-fused input embeddings
   for a prompt with media), its first token sampled, and its KV rows merged into the batch. Text prompts
   asking for prompt log-probs that end at their first token (``max_tokens`` 0 or 1: a teacher's top-k)
   run together as one batch without a cache instead (:mod:`.prompt_logprobs`);
2. one batched decode step for every running sequence (left-padded cache, per-row positions);
3. sample each row with its own :class:`~.sampling.Sampler`, release text, drop rows that ended
   (EOS, stop string, ``max_tokens``, cancelled); a new request joins at the next step.

Why written here and not taken from transformers: its continuous batching
(``ContinuousBatchingManager`` / ``generate_batch`` / ``transformers serve --continuous-batching``)
takes token ids only, while a plugin request's prefill must enter the decoder as input embeddings
with the plugin's features fused at the placeholders; keeping one loop for text and media (and
for evaluation) means what the held-out evaluation measures is what the server answers.
The cache is transformers' own ``DynamicCache``; only its rows are padded, merged and dropped here.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from autoglm_train.engine.detokenize import IncrementalDecoder, TextAssembler
from autoglm_train.engine.prompt_logprobs import PromptScores, prompt_scores
from autoglm_train.engine.sampling import Sampler, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A tokenized prompt and the preprocessed media its placeholders stand for."""

    ids: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Plugin name → its preprocessed batch (one item)."""
    text: str | None = None


@dataclass
class Delta:
    """Output of one decode step: newly released text, the token(s) behind it, and the end when reached."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


Event = PromptScores | Delta


@dataclass
class Sequence:
    """One generation: its prompt, settings, where its events go, and its place in the batch."""

    prompt: Prompt
    params: SamplingParams
    emit: Callable[[Event], None]
    cancel: threading.Event
    sampler: Sampler | None = None
    text: TextAssembler | None = None
    generated: int = 0
    next_token: int = -1
    position: int = 0
    """Tokens in this row's cache: the position of the token fed next."""


class Scheduler:
    """Batches running sequences step by step on one background thread.

    Args:
        prefill: ``(prompt, keep_all_logits) -> (logits [1, T or 1, V], cache)`` for one prompt.
        decode: ``(input_ids [B, 1], attention_mask [B, T+1], position_ids [B, 1], cache)`` →
            ``(logits [B, 1, V], cache)``.
        new_cache: an empty cache of the decoder's kind (merged rows go into it).
        lock: held around every forward pass (plugins are built under it too).
        tokenizer: for detokenizing.
        eos_ids: tokens that end a generation.
        vocab_limit: tokens beyond this (embedding padding) are never sampled.
        max_batch: sequences decoded together at most; more wait for a free row.
        score: ``(prompts) -> logits [T_i, V] each`` for text prompts that need no cache (one batched forward);
            None prefills them one by one like any other.
    """

    def __init__(
        self,
        prefill: Callable[[Prompt, bool], tuple[torch.Tensor, Any]],
        decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]],
        new_cache: Callable[[], Any],
        lock: threading.Lock,
        tokenizer,
        eos_ids: set[int],
        vocab_limit: int,
        max_batch: int = 64,
        score: Callable[[list[Prompt]], list[torch.Tensor]] | None = None,
    ) -> None:
        self._prefill, self._decode, self._new_cache, self._score = prefill, decode, new_cache, score
        self.lock = lock
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.vocab_limit = vocab_limit
        self.max_batch = max_batch
        self.decode_steps = 0
        """Batched decode forward passes so far; shows that a cancelled generation stopped."""
        self.peak_batch = 0
        """The most sequences ever decoded in one step (evidence that requests were batched)."""
        self.peak_scored = 0
        """The most prompts ever scored in one batched forward (:meth:`_score_together`)."""
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # --- submitting -------------------------------------------------------------------------
    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences; they join the running batch at the next step."""
        with self._wake:
            self._waiting.extend(sequences)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="generate-loop", daemon=True)
                self._thread.start()
                # An idle loop thread left running into interpreter shutdown can abort the process
                # ("terminate called without an active exception"): stop it first.
                atexit.register(self.close)
            self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop thread once its running sequences are done or cancelled (at exit; a new submit restarts it)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with self._wake:
            self._closing = True
            self._wake.notify()
        thread.join(timeout)
        self._closing = False

    @property
    def serving(self) -> bool:
        """True once the loop thread runs (a server engine); :meth:`run_here` is then refused."""
        return self._thread is not None and self._thread.is_alive()

    def run_here(self, sequences: list[Sequence]) -> None:
        """Run ``sequences`` to the end on the calling thread: the same steps, no loop thread.

        Evaluation inside a training process uses this, so generation stays in the caller's
        autocast and device context; an engine serving requests uses :meth:`submit`.
        """
        with self._wake:
            if self.serving:
                raise RuntimeError("run_here: the loop thread is serving requests; submit() instead")
            self._waiting.extend(sequences)
        while self._waiting or self._running:
            room = max(0, self.max_batch - len(self._running))
            admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self._step(admitted)

    # --- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running:
                    if self._closing:
                        return
                    self._wake.wait()
                room = max(0, self.max_batch - len(self._running))
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                self._step(admitted)
            except BaseException as err:  # a failed forward ends every sequence it touched, with the error
                log.exception("generation step failed")
                for seq in [*self._running, *admitted]:
                    seq.emit(err)  # type: ignore[arg-type]
                self._running, self._cache, self._mask = [], None, None

    @torch.inference_mode()
    def _step(self, admitted: list[Sequence]) -> None:
        short = self._score_only(admitted)
        if short:
            self._score_together(short)
            admitted = [seq for seq in admitted if all(seq is not other for other in short)]
        joined = []
        for seq in admitted:
            row = self._start(seq)
            if row is not None:
                joined.append(row)
        if joined:
            self._merge(joined)
        self._drop_cancelled()
        if not self._running:
            return
        batch = len(self._running)
        self.peak_batch = max(self.peak_batch, batch)
        ids = torch.tensor([[s.next_token] for s in self._running], device=self._mask.device)
        positions = torch.tensor([[s.position] for s in self._running], device=self._mask.device)
        mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        with self.lock:
            logits, self._cache = self._decode(ids, mask, positions, self._cache)
            self.decode_steps += 1
        self._mask = mask
        logits = logits[:, -1].float()
        # One argmax for the whole batch instead of one per row: most served traffic is plain greedy.
        argmax: list[int | None] = [None] * batch
        if any(seq.sampler.plain_greedy for seq in self._running):
            argmax = logits[:, : self.vocab_limit].argmax(dim=-1).tolist()
        keep = []
        for row, seq in enumerate(self._running):
            seq.position += 1
            if not self._advance(seq, logits[row], argmax[row]):
                keep.append(row)
        if len(keep) < batch:
            self._select(keep)

    def _score_only(self, admitted: list[Sequence]) -> list[Sequence]:
        """The admitted text prompts asking for prompt log-probs that end at their first token: no cache, no decode."""
        if self._score is None:
            return []
        return [
            s
            for s in admitted
            if s.params.prompt_logprobs is not None
            and s.params.max_tokens <= 1
            and not s.prompt.inputs
            and not s.cancel.is_set()
        ]

    def _score_together(self, sequences: list[Sequence]) -> None:
        """One batched forward for ``sequences`` (:meth:`_score_only`), then each one's scores and token."""
        self.peak_scored = max(self.peak_scored, len(sequences))
        try:
            with self.lock:
                logits = self._score([seq.prompt for seq in sequences])
        except Exception as err:
            for seq in sequences:
                seq.emit(err)  # type: ignore[arg-type]
            return
        for seq, rows in zip(sequences, logits, strict=True):
            self._first_token(seq, rows[None])

    def _start(self, seq: Sequence) -> tuple[Sequence, Any] | None:
        """Prefill one sequence and sample its first token; its cache when it goes on, else None."""
        if seq.cancel.is_set():
            seq.emit(Delta(finish_reason="cancelled"))
            return None
        try:
            with self.lock:
                logits, cache = self._prefill(seq.prompt, seq.params.prompt_logprobs is not None)
        except Exception as err:
            seq.emit(err)  # type: ignore[arg-type]
            return None
        return (seq, cache) if self._first_token(seq, logits) else None

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """From the prompt's logits [1, T or 1, V]: its scores when asked, then the first token; True if it goes on."""
        params = seq.params
        if params.prompt_logprobs is not None:
            seq.emit(prompt_scores(logits[0], seq.prompt.ids, params.prompt_logprobs, self.vocab_limit))
        if params.max_tokens == 0:
            seq.emit(Delta(finish_reason="length"))
            return False
        seq.sampler = Sampler(params, self.vocab_limit)
        seq.text = TextAssembler(IncrementalDecoder(self.tokenizer, seq.prompt.ids), params.stop)
        seq.position = len(seq.prompt.ids)
        return not self._advance(seq, logits[0, -1].float())

    def _advance(self, seq: Sequence, logits: torch.Tensor, argmax: int | None = None) -> bool:
        """Sample the next token of ``seq`` and release its text; True when the sequence has ended."""
        if seq.cancel.is_set():
            seq.emit(Delta(finish_reason="cancelled"))
            return True
        token, record = seq.sampler(logits, argmax)
        records = [record] if record else []
        seq.generated += 1
        if token in self.eos_ids and not seq.params.ignore_eos:
            # EOS adds no text but is a generated token: it counts and keeps its logprob
            seq.emit(Delta(seq.text.finish(), [token], records, "stop"))
            return True
        piece, stopped = seq.text.push(token)
        seq.emit(Delta(piece, [token], records, "stop" if stopped else None))
        if stopped:
            return True
        if seq.generated >= seq.params.max_tokens:
            seq.emit(Delta(seq.text.finish(), finish_reason="length"))
            return True
        seq.next_token = token
        return False

    # --- the batch's cache ------------------------------------------------------------------
    def _merge(self, joined: list[tuple[Sequence, Any]]) -> None:
        """Append new rows to the batch: every row's keys/values left-padded to the longest."""
        old_len = 0 if self._mask is None else self._mask.shape[1]
        width = max(old_len, *(c.get_seq_length() for _, c in joined))
        parts_k: list[list[torch.Tensor]] = []
        parts_v: list[list[torch.Tensor]] = []
        masks = []
        sources = ([] if self._cache is None else [(self._cache, self._mask)]) + [(cache, None) for _, cache in joined]
        for cache, mask in sources:
            length = cache.get_seq_length()
            pad = width - length
            keys = [_pad_left(layer.keys, pad) for layer in cache.layers]
            values = [_pad_left(layer.values, pad) for layer in cache.layers]
            rows = keys[0].shape[0]
            if mask is None:
                mask = torch.ones(rows, length, dtype=torch.long, device=keys[0].device)
            masks.append(F.pad(mask, (pad, 0)))
            parts_k.append(keys)
            parts_v.append(values)
        merged = self._new_cache()
        for layer in range(len(parts_k[0])):
            merged.update(torch.cat([k[layer] for k in parts_k]), torch.cat([v[layer] for v in parts_v]), layer)
        self._cache, self._mask = merged, torch.cat(masks)
        self._running += [seq for seq, _ in joined]

    def _drop_cancelled(self) -> None:
        keep = []
        for row, seq in enumerate(self._running):
            if seq.cancel.is_set():
                seq.emit(Delta(finish_reason="cancelled"))
            else:
                keep.append(row)
        if len(keep) < len(self._running):
            self._select(keep)

    def _select(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch, and drop the cache columns no kept row uses."""
        self._running = [self._running[r] for r in rows]
        if not rows:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(rows, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]


def _pad_left(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    """``[B, H, T, D]`` → ``[B, H, pad + T, D]`` with zeros in front (masked out, never attended)."""
    return F.pad(tensor, (0, 0, pad, 0)) if pad else tensor
