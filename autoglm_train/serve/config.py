"""The server's settings: one typed, self-checking dataclass (the CLI fills it, tests build it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

NO_AUTH_KEY = "EMPTY"
QUANTIZE = (None, "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ServerConfig:
    """Everything ``create_app`` needs besides the model itself."""

    bundle: str
    """A serving bundle (``manifest.json`` + ``decoder/`` + ``plugins/``) or any causal LM directory (``--decoder``:
    e.g. a teacher whose top-k log-probs fill a distillation cache)."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    """Accepted bearer tokens. Empty means no key was configured: refused unless ``no_auth`` is set."""
    no_auth: bool = False
    """Serve without any key check (``--no-auth`` / ``--api-key EMPTY``); logged loudly, for local use only."""
    model_name: str | None = None
    """Name in ``/v1/models`` and the ``model`` requests must send; default: the manifest's or the folder's name."""
    device: str = "auto"
    """``auto`` (cuda:0 when present, else cpu), ``cpu``, ``cuda``, ``cuda:N``."""
    dtype: str = "auto"
    """Decoder dtype: ``auto`` = float32 on CPU, the checkpoint's dtype on GPU."""
    quantize: str | None = None
    """``int8``: torchao weight-only int8 on the decoder's linear layers."""
    rate_limit: str | None = "120/minute"
    """Requests per API key (``limits`` syntax, e.g. ``10/second;500/hour``); ``None`` disables."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Request bodies above this get 413 (images and audio arrive base64 inside the JSON body)."""
    max_model_len: int | None = None
    """Prompt + completion token bound; default: the decoder's ``max_position_embeddings``."""
    max_tokens_cap: int = 4096
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 512
    """Chat completions without ``max_tokens`` generate at most this many (bounded by the context)."""
    max_logprobs: int = 20
    """Largest ``logprobs`` / ``prompt_logprobs`` a completion may ask for (vLLM's ``--max-logprobs``)."""
    max_n: int = 8
    """Largest ``n`` (choices per prompt)."""
    max_batch_prompts: int = 64
    """Largest number of prompts in one ``/v1/completions`` request."""
    max_concurrency: int = 16
    """Generations in progress at once; further requests wait their turn."""
    threads: int | None = None
    """``torch.set_num_threads`` for CPU inference; ``None`` keeps torch's default."""
    max_image_pixels: int = 40_000_000
    """Images with more pixels are refused before decoding (decompression bombs)."""
    verify_checksums: bool = False
    """Check every bundle file against ``manifest.json`` sha256 before loading (slow for 9B bundles)."""

    def __post_init__(self) -> None:
        if NO_AUTH_KEY in self.api_keys:
            if len(self.api_keys) > 1:
                raise ValueError(f"--api-key {NO_AUTH_KEY} (no auth) cannot be combined with real keys")
            self.api_keys, self.no_auth = [], True
        if self.no_auth and self.api_keys:
            raise ValueError("--no-auth and --api-key are mutually exclusive")
        if not self.no_auth and not self.api_keys:
            raise ValueError(
                "no API key configured: pass --api-key KEY (or AUTOGLM_API_KEY / --api-key-file), "
                f"or start explicitly without auth with --no-auth / --api-key {NO_AUTH_KEY}"
            )
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("API keys must be non-empty and carry no surrounding whitespace")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize={self.quantize!r}; expected one of {QUANTIZE}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {DTYPES}")
        if self.rate_limit is not None:
            from limits import parse_many

            try:
                parse_many(self.rate_limit)
            except ValueError as err:
                raise ValueError(f"rate_limit={self.rate_limit!r}: {err} (e.g. '60/minute;1000/hour')") from err
        for name in (
            "max_body_bytes",
            "max_tokens_cap",
            "default_max_tokens",
            "max_n",
            "max_batch_prompts",
            "max_logprobs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
