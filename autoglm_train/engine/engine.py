"""The generation engine: requests in, tokens out; what the server, held-out evaluation and the eval tools share.

An engine is built from a serving bundle (the server) or from modules already in memory
(``recipe=add_modality``'s held-out evaluation and its validation): both then generate through the same
:class:`~.scheduler.Scheduler`, so a plugin's held-out score and its served score come from one loop.
Concurrent requests are decoded together; a generation checks its cancel flag before every token, so a
client that disconnects stops its generation within one step.

Each part has its own home: loading the decoder (tokenizer, pins, template probe) in :mod:`.loading`,
the plugins in :mod:`.plugins`, the forward passes in :mod:`.runner`, the batched stepping in
:mod:`.scheduler`; this class puts them together and is the one API. It knows no HTTP: a request it
cannot serve raises an :class:`~.errors.EngineError` (the server maps those to status codes).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from autoglm_train.engine.bundle import BundleInfo
from autoglm_train.engine.loading import LoadedDecoder, attach_decoder, load_decoder
from autoglm_train.engine.plugins import PluginSet
from autoglm_train.engine.runner import ModelRunner
from autoglm_train.engine.sampling import SamplingParams
from autoglm_train.engine.scheduler import Delta, Event, Prompt, PromptScores, Scheduler, Sequence
from autoglm_train.model.prompt_format import PromptFormat, render_chat

__all__ = ["Delta", "Engine", "Prompt", "PromptScores"]


class Engine:
    """Loads a bundle and generates from it.

    Args:
        bundle: what :func:`~.bundle.read_bundle` found.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto`` (float32 on CPU, the checkpoint's dtype on GPU) or a dtype name.
        quantize: ``"int8"``: weight-only int8 with the device's fastest kernel (:mod:`.quantize`).
        max_model_len: prompt + completion bound; default the decoder's ``max_position_embeddings``.
        max_batch: sequences decoded together at most.

    Raises:
        PluginMismatchError: a plugin of the bundle was trained against another decoder.
    """

    def __init__(
        self,
        bundle: BundleInfo,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        max_model_len: int | None = None,
        max_batch: int = 64,
    ) -> None:
        self._assemble(bundle, load_decoder(bundle, device, dtype, quantize, max_model_len), max_batch)
        for directory in bundle.plugin_dirs.values():
            self.model.register_plugin_dir(directory)

    @classmethod
    def in_process(
        cls,
        decoder: torch.nn.Module,
        tokenizer,
        plugins: dict[str, Any] | None = None,
        formats: dict[str, PromptFormat] | None = None,
        max_batch: int = 64,
    ) -> Engine:
        """An engine over modules already in memory: ``plugins`` maps name → a built :class:`ModalityPlugin`.

        Held-out evaluation uses this: the same prompt rendering and generation loop the server runs.
        ``formats`` are the plugins' prompt formats (as their ``plugin.json`` records them).
        """
        from autoglm_train.model.plugin_io import plugin_meta

        self = cls.__new__(cls)
        formats = formats or {}
        meta = {
            name: plugin_meta(plugin, extra={"prompt_format": formats[name].to_dict()} if name in formats else None)
            for name, plugin in (plugins or {}).items()
        }
        bundle = BundleInfo(root=Path("."), decoder_dir=Path("."), plugin_meta=meta, name="in-process")
        self._assemble(bundle, attach_decoder(decoder, tokenizer), max_batch)
        for plugin in (plugins or {}).values():
            self.model.add_plugin(plugin.eval())
        return self

    def _assemble(self, bundle: BundleInfo, loaded: LoadedDecoder, max_batch: int) -> None:
        self.bundle = bundle
        self.loaded = loaded
        self.lock = threading.Lock()
        self.plugins = PluginSet(loaded.decoder, loaded.tokenizer, bundle.plugin_meta, self.lock)
        self.runner = ModelRunner(self.plugins.model, loaded.device)
        self.scheduler = Scheduler(
            self.runner.prefill,
            self.runner.decode,
            self.runner.new_cache,
            self.lock,
            loaded.tokenizer,
            loaded.eos_ids,
            loaded.vocab_limit,
            max_batch,
            score=self.runner.score,
        )

    # --- facts for requests, logs, /health and /metrics ----------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def decoder(self) -> torch.nn.Module:
        return self.loaded.decoder

    @property
    def model(self):
        """The decoder with its plugins (:class:`~autoglm_train.model.modular.ModularLM`)."""
        return self.plugins.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    @property
    def vocab_limit(self) -> int:
        return self.loaded.vocab_limit

    @property
    def thinking(self) -> bool:
        return self.loaded.thinking

    @property
    def slots(self):
        """Modality → the plugin serving it (:class:`~.routing.PluginSlot`)."""
        return self.plugins.slots

    @property
    def reserved(self) -> set[str]:
        return self.plugins.reserved

    @property
    def decode_steps(self) -> int:
        """Batched decode forward passes run so far (all requests)."""
        return self.scheduler.decode_steps

    def loaded_modules(self) -> dict[str, str | None]:
        """Module → the device it sits on, or None while a plugin is not loaded yet."""
        return {"decoder": " + ".join(self.loaded.placement), **self.plugins.loaded()}

    def describe(self) -> list[str]:
        """Start-up lines: which module, what precision, where."""
        decoder, loaded = self.decoder, self.loaded
        # int8pack weights are buffers, not parameters: count both (tied storage once)
        tensors = {t.data_ptr(): t.numel() for t in [*decoder.parameters(), *decoder.buffers()] if t.dim() > 1}
        params = sum(tensors.values())
        quant = f", {loaded.quantization}" if loaded.quantization else ""
        dtype = str(loaded.dtype).removeprefix("torch.")
        lines = [
            f"text decoder: {type(decoder).__name__} ({params / 1e6:.1f}M params, {dtype}{quant}) "
            f"on {' + '.join(loaded.placement)} | context {loaded.max_model_len} tokens | thinking template: "
            f"{'yes' if loaded.thinking else 'no'} | batched decoding, up to {self.scheduler.max_batch} sequences"
        ]
        lines += self.plugins.describe(self.device)
        if not self.tokenizer.chat_template:
            lines.append("no chat template in the tokenizer: /v1/chat/completions answers 400, /v1/completions works")
        return lines

    # --- prompts ----------------------------------------------------------------------
    def render_chat(
        self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any], plugins: tuple[str, ...] = ()
    ) -> str:
        """The prompt text of a chat; with media of ``plugins``, in the format those plugins were trained on.

        The client's own ``enable_thinking`` / template kwargs still win over the recorded switch.

        Raises:
            InvalidRequest: the plugins were trained on different prompt formats.
        """
        fmt = self.plugins.prompt_format(plugins)
        if fmt is not None:
            return fmt.render(self.tokenizer, messages, template_kwargs)
        return render_chat(self.tokenizer, None, messages, template_kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def modality_inputs(self, items: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        """Decoded media → each plugin's input batch; a plugin is built (weights read) at its first use.

        Raises:
            InvalidRequest: media the plugin cannot take (too short, wrong shape).
            PluginUnavailable: a plugin failed to load.
        """
        return self.plugins.inputs(items, self.device)

    # --- generation -------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event) -> Iterator[Event]:
        """One choice's events: :class:`PromptScores` first when asked, then :class:`Delta` s.

        The last delta carries the finish reason: ``stop`` (EOS or a stop string), ``length``
        (``max_tokens``) or ``cancelled``.
        """
        for _, event in self.stream_many([(prompt, params)], cancel):
            yield event

    def submit_many(
        self,
        jobs: list[tuple[Prompt, SamplingParams]],
        cancel: threading.Event,
        emit: Callable[[tuple[int, Event]], None],
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Queue every ``(prompt, params)`` into the running batch and return at once.

        The generation thread then calls ``emit((job index, event))`` for each event, and ``done(None)``
        once every job has finished, or ``done(error)`` (with ``cancel`` set) at the first failure.
        """
        open_jobs = len(jobs)

        def on_event(index: int, event: Event | BaseException) -> None:
            nonlocal open_jobs
            if open_jobs == 0:
                return  # after a failure: the other jobs' cancellations are not reported
            if isinstance(event, BaseException):
                open_jobs = 0
                cancel.set()
                done(event)
                return
            emit((index, event))
            if isinstance(event, Delta) and event.finish_reason:
                open_jobs -= 1
                if open_jobs == 0:
                    done(None)

        if not jobs:
            done(None)
            return
        self.scheduler.submit(
            [Sequence(prompt, params, lambda e, i=i: on_event(i, e), cancel) for i, (prompt, params) in enumerate(jobs)]
        )

    def stream_many(
        self, jobs: list[tuple[Prompt, SamplingParams]], cancel: threading.Event
    ) -> Iterator[tuple[int, Event]]:
        """:meth:`submit_many` as a blocking iterator of ``(job index, event)``; leaving it early cancels."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        end = object()
        self.submit_many(jobs, cancel, events.put, lambda error: events.put((end, error)))
        finished = False
        try:
            while True:
                item = events.get()
                if item[0] is end:
                    finished = True
                    if item[1] is not None:
                        raise item[1]
                    return
                yield item
        finally:
            if not finished:
                cancel.set()

    def generate(self, prompts: list[Prompt], params: SamplingParams, logprobs: list[list[float]] | None = None):
        """Every prompt's generated token ids (EOS included when reached), batched on the calling thread.

        The evaluation's call: the scheduler's own steps, driven here instead of on its loop thread (or joining
        the loop's running batch when this engine already serves requests). With ``params.logprobs`` set, each
        token's logprob is appended to ``logprobs`` (one list per prompt).
        """
        tokens: list[list[int]] = [[] for _ in prompts]
        if logprobs is not None:
            logprobs[:] = [[] for _ in prompts]

        def collect(index: int, event: Event | BaseException) -> None:
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Delta):
                tokens[index] += event.token_ids
                if logprobs is not None:
                    logprobs[index] += [r.logprob for r in event.logprobs]

        if self.scheduler.serving:
            for index, event in self.stream_many([(p, params) for p in prompts], threading.Event()):
                collect(index, event)
            return tokens
        cancel = threading.Event()
        self.scheduler.run_here(
            [Sequence(p, params, lambda e, i=i: collect(i, e), cancel) for i, p in enumerate(prompts)]
        )
        return tokens
