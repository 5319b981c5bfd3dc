"""The generation engine: the bundle's decoder (+ plugins on demand) and a token loop with a KV cache.

One model, many requests: every forward pass (a prompt's prefill or one decode step) holds a
single lock, so concurrent generations interleave token by token on worker threads while the
event loop stays free. A generation checks its cancel flag before every step, so a client
that disconnects stops its generation within one token.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from autoglm_train.model.decoder import MODALITY_TOKENS
from autoglm_train.serve.bundle import BundleInfo
from autoglm_train.serve.detokenize import IncrementalDecoder, TextAssembler
from autoglm_train.serve.errors import APIError
from autoglm_train.serve.multimodal import PART_PLACEHOLDER, PluginSlot
from autoglm_train.serve.sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Prompt:
    """A tokenized prompt and the raw media items its placeholders stand for."""

    ids: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Plugin name → its preprocessed batch (one item), from :meth:`Engine.modality_inputs`."""
    text: str | None = None


@dataclass
class PromptScores:
    """Logprobs of the prompt's own tokens (the first has none: nothing precedes it)."""

    logprobs: list[TokenLogprob | None]


@dataclass
class Delta:
    """Output of one decode step: newly released text, the token(s) behind it, and the end when reached."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Engine:
    """Loads a bundle and generates from it.

    Args:
        bundle: what :func:`read_bundle` found.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto`` (float32 on CPU, the checkpoint's dtype on GPU) or a dtype name.
        quantize: ``"int8"`` for torchao weight-only int8 linear layers.
        max_model_len: prompt + completion bound; default the decoder's ``max_position_embeddings``.
    """

    def __init__(
        self,
        bundle: BundleInfo,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        max_model_len: int | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from autoglm_train.model.modular import ModularLM

        self.bundle = bundle
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle.decoder_dir))
        decoder, torch_dtype = self._load_decoder(device, dtype)
        # inputs go where the embeddings are (the first GPU when the decoder is split across several)
        self.device = decoder.get_input_embeddings().weight.device
        self.placement = sorted({str(p.device) for p in decoder.parameters()})
        self.quantization = None
        if quantize == "int8":
            self.quantization = quantize_int8(decoder)
        vocab = self.tokenizer.get_vocab()
        self._check_plugins(vocab, decoder.config.hidden_size)
        placeholders = {
            t: vocab[t]
            for t in {*MODALITY_TOKENS, *(m["placeholder"] for m in bundle.plugin_meta.values())}
            if t in vocab
        }
        self.model = ModularLM(decoder, placeholders)
        for directory in bundle.plugin_dirs.values():
            self.model.register_plugin_dir(directory)
        self.decoder = decoder
        self.dtype = torch_dtype
        self.lock = threading.Lock()
        self.decode_steps = 0
        """Decode forward passes run so far (all requests); shows that a cancelled generation stopped."""
        self.vocab_limit = min(len(self.tokenizer), decoder.config.vocab_size)
        context = int(getattr(decoder.config, "max_position_embeddings", 0) or 2048)
        self.max_model_len = min(max_model_len or context, context)
        self.eos_ids = self._eos_ids()
        self.slots = self._slots()
        self.reserved = set(placeholders)
        params = inspect.signature(decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.thinking = self._template_thinks()

    # --- set-up ------------------------------------------------------------------------
    def _load_decoder(self, device: str, dtype: str) -> tuple[torch.nn.Module, torch.dtype]:
        """The HF decoder on ``device``; ``auto`` with several GPUs splits its layers across them."""
        from transformers import AutoModelForCausalLM

        gpus = torch.cuda.device_count()
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        on_cpu = torch.device(device).type == "cpu"
        if dtype == "auto":
            config = json.loads((self.bundle.decoder_dir / "config.json").read_text())
            saved = str(config.get("dtype") or config.get("torch_dtype"))
            torch_dtype = torch.float32 if on_cpu else _DTYPES.get(saved, torch.bfloat16)
        else:
            torch_dtype = _DTYPES[dtype]
        # device_map loads weights straight onto the GPU(s) (accelerate), never staging a copy in CPU memory
        device_map = None if on_cpu else ("auto" if device == "cuda" and gpus > 1 else device)
        decoder = AutoModelForCausalLM.from_pretrained(
            str(self.bundle.decoder_dir), dtype=torch_dtype, device_map=device_map, use_safetensors=True
        )
        return decoder.eval(), torch_dtype

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

    def _slots(self) -> dict[str, PluginSlot]:
        """Content part type → the plugin whose placeholder it feeds."""
        slots = {}
        for name, meta in self.bundle.plugin_meta.items():
            for kind, placeholder in PART_PLACEHOLDER.items():
                if meta.get("placeholder") == placeholder:
                    slots[kind] = PluginSlot(name, placeholder, int(meta["num_tokens"]))
        return slots

    def _template_thinks(self) -> bool:
        probe = [{"role": "user", "content": "hi"}]
        try:
            on = self.render_chat(probe, {"enable_thinking": True})
            off = self.render_chat(probe, {"enable_thinking": False})
        except Exception:
            return False
        return on != off

    # --- facts for logs, /health and /metrics -----------------------------------------
    def loaded_modules(self) -> dict[str, str | None]:
        """Module → the device it sits on, or None while a plugin is not loaded yet."""
        out: dict[str, str | None] = {"decoder": " + ".join(self.placement)}
        built = dict(self.model.plugins.items())
        for name in self.bundle.plugin_dirs:
            plugin = built.get(name)
            out[name] = str(next(plugin.parameters()).device) if plugin is not None else None
        return out

    def describe(self) -> list[str]:
        """Start-up lines: which module, what precision, where."""
        params = sum(p.numel() for p in self.decoder.parameters())
        quant = f", {self.quantization}" if self.quantization else ""
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"text decoder: {type(self.decoder).__name__} ({params / 1e6:.1f}M params, {dtype}{quant}) "
            f"on {' + '.join(self.placement)} | context {self.max_model_len} tokens | thinking template: "
            f"{'yes' if self.thinking else 'no'}"
        ]
        for name, meta in self.bundle.plugin_meta.items():
            kinds = [k for k, s in self.slots.items() if s.name == name]
            lines.append(
                f"{name} plugin ({meta.get('_target_', '?').rsplit('.', 1)[-1]}, {meta.get('num_tokens')} x "
                f"{meta.get('placeholder')}, serves {', '.join(kinds) or 'no content part type'}): "
                f"on demand, loads onto {self.device} at first use"
            )
        if not self.bundle.plugin_meta:
            lines.append("plugins: none (text only)")
        if not self.tokenizer.chat_template:
            lines.append("no chat template in the tokenizer: /v1/chat/completions answers 400, /v1/completions works")
        return lines

    # --- prompts ----------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # --- generation -------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event) -> Iterator[PromptScores | Delta]:
        """Generate one choice: :class:`PromptScores` first when asked, then :class:`Delta` s.

        The last delta carries the finish reason: ``stop`` (EOS or a stop string), ``length``
        (``max_tokens``) or ``cancelled``.
        """
        ids = torch.tensor([prompt.ids], device=self.device)
        keep = 0 if params.prompt_logprobs is not None else 1
        with self.lock:
            if prompt.inputs:
                embeds = self.model.embed(ids, prompt.inputs)
                out = self.decoder(inputs_embeds=embeds, use_cache=True, logits_to_keep=keep)
            else:
                out = self.decoder(input_ids=ids, use_cache=True, logits_to_keep=keep)
        if params.prompt_logprobs is not None:
            scored = token_logprobs(out.logits[0, :-1], ids[0, 1:], params.prompt_logprobs) if ids.shape[1] > 1 else []
            yield PromptScores([None, *scored])
        if params.max_tokens == 0:
            yield Delta(finish_reason="length")
            return
        cache = _cache_of(out)
        logits = out.logits[0, -1]
        del out
        sample = Sampler(params, self.vocab_limit)
        text = TextAssembler(IncrementalDecoder(self.tokenizer, prompt.ids), params.stop)
        for step in range(params.max_tokens):
            if cancel.is_set():
                yield Delta(finish_reason="cancelled")
                return
            token, record = sample(logits)
            if token in self.eos_ids and not params.ignore_eos:
                # EOS adds no text but is a generated token: it counts and keeps its logprob
                # (lm-eval's loglikelihood drops exactly one generated token from echoed logprobs)
                yield Delta(text.finish(), [token], [record] if record else [], "stop")
                return
            piece, stopped = text.push(token)
            yield Delta(piece, [token], [record] if record else [], "stop" if stopped else None)
            if stopped:
                return
            if step + 1 == params.max_tokens:
                break
            with self.lock:
                self.decode_steps += 1
                out = self.decoder(
                    input_ids=torch.tensor([[token]], device=self.device), use_cache=True, **{self._cache_arg: cache}
                )
            cache = _cache_of(out)
            logits = out.logits[0, -1]
        yield Delta(text.finish(), finish_reason="length")

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


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def quantize_int8(decoder: torch.nn.Module) -> str:
    """torchao weight-only int8 on every linear layer (embeddings and norms stay in their dtype)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError("--quantize int8 needs torchao: pip install 'autoglm-train[quant]'") from err
    quantize_(decoder, Int8WeightOnlyConfig())
    return "int8 weight-only (torchao)"
