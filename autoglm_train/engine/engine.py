"""The generation engine: a decoder (+ plugins on demand), prompt rendering, and the batched loop.

An engine is built from a serving bundle (the server) or from modules already in memory
(``recipe=add_modality``'s held-out evaluation): both then generate through the same
:class:`~.scheduler.Scheduler`, so a plugin's held-out score and its served score come from one
loop. Concurrent requests are decoded together; a generation checks its cancel flag before every
token, so a client that disconnects stops its generation within one step.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from autoglm_train.engine.bundle import BundleInfo
from autoglm_train.engine.head import body_of, vocab_head
from autoglm_train.engine.quantize import load_serving_decoder
from autoglm_train.engine.routing import PluginSlot, plugin_slots
from autoglm_train.engine.sampling import SamplingParams
from autoglm_train.engine.scheduler import Delta, Event, Prompt, PromptScores, Scheduler, Sequence
from autoglm_train.model.decoder import MODALITY_TOKENS
from autoglm_train.model.prompt_format import PromptFormat, render_chat
from autoglm_train.serve.api_error import APIError

log = logging.getLogger(__name__)

__all__ = ["Delta", "Engine", "Prompt", "PromptScores"]


class Engine:
    """Loads a bundle and generates from it.

    Args:
        bundle: what :func:`read_bundle` found.
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
        from transformers import AutoTokenizer

        self.bundle = bundle
        tokenizer = AutoTokenizer.from_pretrained(str(bundle.decoder_dir))
        decoder, torch_dtype, quantization = load_serving_decoder(bundle, device, dtype, quantize)
        check_plugin_pins(bundle, tokenizer)
        self._attach(decoder, tokenizer, torch_dtype, max_model_len, max_batch)
        self.quantization = quantization
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
        self.bundle = BundleInfo(root=Path("."), decoder_dir=Path("."), plugin_meta=meta, name="in-process")
        dtype = next(decoder.parameters()).dtype
        self._attach(decoder.eval(), tokenizer, dtype, None, max_batch)
        self.quantization = None
        for plugin in (plugins or {}).values():
            self.model.add_plugin(plugin.eval())
        return self

    def _attach(self, decoder, tokenizer, dtype: torch.dtype, max_model_len: int | None, max_batch: int) -> None:
        from autoglm_train.model.modular import ModularLM

        self.tokenizer = tokenizer
        # inputs go where the embeddings are (the first GPU when the decoder is split across several)
        self.device = decoder.get_input_embeddings().weight.device
        self.placement = sorted({str(p.device) for p in decoder.parameters()})
        vocab = tokenizer.get_vocab()
        self._check_plugins(vocab, decoder.config.hidden_size)
        placeholders = {
            t: vocab[t]
            for t in {*MODALITY_TOKENS, *(m["placeholder"] for m in self.bundle.plugin_meta.values())}
            if t in vocab
        }
        self.model = ModularLM(decoder, placeholders).eval()  # plugins loaded on demand run in eval mode too
        self.decoder = decoder
        self.dtype = dtype
        self.lock = threading.Lock()
        self.vocab_limit = min(len(tokenizer), decoder.config.vocab_size)
        context = int(getattr(decoder.config, "max_position_embeddings", 0) or 2048)
        self.max_model_len = min(max_model_len or context, context)
        self.eos_ids = self._eos_ids()
        self.slots: dict[str, PluginSlot] = plugin_slots(self.bundle.plugin_meta)
        self.formats = {
            name: PromptFormat.from_dict(meta["prompt_format"])
            for name, meta in self.bundle.plugin_meta.items()
            if meta.get("prompt_format")
        }
        self.reserved = set(placeholders)
        self._body, self._head = body_of(decoder), vocab_head(decoder)
        params = inspect.signature(self._body.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.thinking = self._template_thinks()
        self.scheduler = Scheduler(
            self._prefill, self._decode, _new_cache, self.lock, tokenizer, self.eos_ids, self.vocab_limit, max_batch
        )

    # --- set-up checks ------------------------------------------------------------------
    def _check_plugins(self, vocab: dict[str, int], hidden_size: int) -> None:
        """Refuse at start-up (not at the first image) a plugin that cannot attach to this decoder."""
        for name, meta in self.bundle.plugin_meta.items():
            if meta.get("placeholder") not in vocab:
                raise ValueError(
                    f"plugin {name}: placeholder {meta.get('placeholder')!r} is not a token of the decoder's tokenizer"
                )
            if meta.get("hidden_size") not in (None, hidden_size):
                raise ValueError(
                    f"plugin {name}: projects to {meta['hidden_size']}, the decoder's hidden size is {hidden_size}"
                )

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.decoder.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _template_thinks(self) -> bool:
        probe = [{"role": "user", "content": "hi"}]
        try:
            on = self.render_chat(probe, {"enable_thinking": True})
            off = self.render_chat(probe, {"enable_thinking": False})
        except Exception:
            return False
        return on != off

    # --- facts for logs, /health and /metrics -----------------------------------------
    @property
    def decode_steps(self) -> int:
        """Batched decode forward passes run so far (all requests)."""
        return self.scheduler.decode_steps

    def loaded_modules(self) -> dict[str, str | None]:
        """Module → the device it sits on, or None while a plugin is not loaded yet."""
        out: dict[str, str | None] = {"decoder": " + ".join(self.placement)}
        built = dict(self.model.plugins.items())
        for name in self.bundle.plugin_meta:
            plugin = built.get(name)
            out[name] = str(next(plugin.parameters()).device) if plugin is not None else None
        return out

    def describe(self) -> list[str]:
        """Start-up lines: which module, what precision, where."""
        # int8pack weights are buffers, not parameters: count both (tied storage once)
        tensors = {
            t.data_ptr(): t.numel() for t in [*self.decoder.parameters(), *self.decoder.buffers()] if t.dim() > 1
        }
        params = sum(tensors.values())
        quant = f", {self.quantization}" if self.quantization else ""
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"text decoder: {type(self.decoder).__name__} ({params / 1e6:.1f}M params, {dtype}{quant}) "
            f"on {' + '.join(self.placement)} | context {self.max_model_len} tokens | thinking template: "
            f"{'yes' if self.thinking else 'no'} | batched decoding, up to {self.scheduler.max_batch} sequences"
        ]
        for name, meta in self.bundle.plugin_meta.items():
            kinds = [k for k, s in self.slots.items() if s.name == name]
            fmt = self.formats.get(name)
            trained = (
                f"trained on {'/'.join(fmt.orders)} chat prompts, thinking {'on' if fmt.enable_thinking else 'off'}"
                if fmt
                else "no recorded prompt format"
            )
            lines.append(
                f"{name} plugin ({meta.get('_target_', '?').rsplit('.', 1)[-1]}, {meta.get('num_tokens')} x "
                f"{meta.get('placeholder')}, serves {', '.join(kinds) or 'no content part type'}; {trained}): "
                f"on demand, loads onto {self.device} at first use"
            )
        if not self.bundle.plugin_meta:
            lines.append("plugins: none (text only)")
        if not self.tokenizer.chat_template:
            lines.append("no chat template in the tokenizer: /v1/chat/completions answers 400, /v1/completions works")
        return lines

    # --- prompts ----------------------------------------------------------------------
    def render_chat(
        self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any], plugins: tuple[str, ...] = ()
    ) -> str:
        """The prompt text of a chat; with media of ``plugins``, in the format those plugins were trained on.

        The client's own ``enable_thinking`` / template kwargs still win over the recorded switch.
        """
        formats = {self.formats[name] for name in plugins if name in self.formats}
        if len(formats) > 1:
            raise APIError(
                400,
                f"the plugins {', '.join(plugins)} were trained on different prompt formats; send their media "
                "in separate requests",
                param="messages",
                code="incompatible_plugins",
            )
        if formats:
            return formats.pop().render(self.tokenizer, messages, template_kwargs)
        return render_chat(self.tokenizer, None, messages, template_kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

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

    def modality_inputs(self, items: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        """Decoded media → each plugin's input batch; a plugin is built (weights read) at its first use.

        Raises:
            APIError: 400 for media the plugin cannot take (too short, wrong shape), 503 when a
                plugin fails to load.
        """
        inputs = {}
        for name, batch in items.items():
            if not batch:
                continue
            with self.lock:  # building a plugin adds a submodule: not while a forward pass runs
                first = name not in self.model.plugins
                try:
                    plugin = self.model.plugin(name)
                except Exception as err:
                    log.exception("plugin %s failed to load", name)
                    raise APIError(
                        503, f"the {name} plugin could not be loaded: {err}", code="plugin_unavailable"
                    ) from err
            if first:
                log.info("on demand: %s plugin loaded onto %s", name, self.loaded_modules()[name])
            try:
                inputs[name] = plugin.preprocess(batch).to(self.device)
            except ValueError as err:
                raise APIError(400, str(err), param="messages", code="invalid_media") from err
        return inputs

    # --- forward passes (called by the scheduler, under the lock) -------------------------
    def _prefill(self, prompt: Prompt, all_logits: bool) -> tuple[torch.Tensor, Any]:
        """One prompt through the decoder: every attached plugin's fusion, then the decoder with a fresh cache."""
        ids = torch.tensor([prompt.ids], device=self.device)
        embeds = self.model.embed(ids, prompt.inputs)
        out = self._body(inputs_embeds=embeds, use_cache=True)
        hidden = out.last_hidden_state
        return self._head(hidden if all_logits else hidden[:, -1:]), _cache_of(out)

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any):
        out = self._body(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache}
        )
        return self._head(out.last_hidden_state), _cache_of(out)


def check_plugin_pins(bundle: BundleInfo, tokenizer) -> None:
    """Refuse a bundle whose plugin was trained against another decoder (both fingerprints in the message)."""
    from autoglm_train.model.decoder_dir import placeholder_ids
    from autoglm_train.model.manifest import pin_decoder
    from autoglm_train.model.plugin_io import PluginMismatchError

    pinned = {name: m.get("decoder_fingerprint") for name, m in bundle.plugin_meta.items()}
    if not any(pinned.values()):
        return
    current = pin_decoder(bundle.decoder_dir, placeholder_ids(tokenizer), hash_weights=False).fingerprint
    for name, trained_for in pinned.items():
        if trained_for and trained_for != current:
            raise PluginMismatchError(
                f"plugin {name} ({bundle.plugin_dirs.get(name)}) was trained against decoder {trained_for}, "
                f"but this bundle's decoder ({bundle.decoder_dir}) is {current}; retrain it with recipe=add_modality"
            )


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
