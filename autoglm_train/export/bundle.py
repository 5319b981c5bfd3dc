"""Export a run's decoder (and plugins) into a serving bundle, atomically.

Layout (every form optional except ``decoder/``)::

    <out>/manifest.json            modules, forms (dtype/quantization), sha256 of every file, versions, parity
    <out>/decoder/                 plain HF GlmForCausalLM dir + tokenizer + thinking chat template
    <out>/int8/                    int8 weight-only HF dir (torchao quantization_config; transformers loads it alone);
                                   the run's student_int8/ as PTQ measured it, when written from this decoder
    <out>/gguf/model-f16.gguf      llama.cpp, f16
    <out>/gguf/model-q8_0.gguf     llama.cpp, q8_0
    <out>/onnx/model.onnx(.data)   onnxruntime, fp32 logits graph
    <out>/plugins/<name>/          plugin.json + model.safetensors, as trained

Everything is written into a temporary sibling directory, verified there, and moved into place
with one rename; an existing bundle is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_train.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST, BundleError, library_versions
from autoglm_train.export.manifest import write_manifest as _write_manifest
from autoglm_train.model.hf_io import read_config

GGUF_QTYPES = ("f16", "q8_0")
PLUGIN_ARTIFACT_MANIFEST = "manifest.json"  # written next to a plugin by recipe=add_modality (its decoder pin)


@dataclass
class ExportOptions:
    """What to export and how."""

    decoder: str
    """The run's student decoder: a plain HF directory written by ``save_hf_decoder`` (fp32)."""
    out: str
    """The bundle directory to create."""
    plugins: list[str] = field(default_factory=list)
    """Plugin folders (``plugin.json`` + ``model.safetensors``) to ship under ``plugins/<name>/``."""
    name: str | None = None
    """Model name recorded in the manifest and GGUF metadata; default: the bundle directory's name."""
    dtype: str = "bfloat16"
    """dtype of the HF ``decoder/``: float32 | float16 | bfloat16."""
    int8: bool = True
    """Write the ``int8/`` form."""
    gguf: list[str] = field(default_factory=lambda: list(GGUF_QTYPES))
    """GGUF files to write (``f16``, ``q8_0``); empty for none."""
    onnx: bool = True
    """Write the ``onnx/`` form."""
    verify: bool = True
    """Check parity of every form before the bundle is moved into place; a failure leaves no bundle."""
    overwrite: bool = False
    """Replace an existing bundle at ``out``."""
    chat_template: str | None = None
    """A Jinja chat template file to ship instead of the built-in ChatML thinking template."""
    gguf_pre: str | None = None
    """llama.cpp pre-tokenizer name, for a tokenizer the exporter does not recognise."""
    progress: bool = True
    """Print step-by-step progress on stderr."""
    rtol: dict[str, float] = field(default_factory=dict)
    """Parity tolerance overrides by key (``hf:bfloat16``, ``int8``, ``gguf_q8_0``, ...; see ``parity.TOLERANCES``)."""

    def __post_init__(self) -> None:
        from autoglm_train.export.hf_dir import DTYPES

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        bad = [q for q in self.gguf if q not in GGUF_QTYPES]
        if bad:
            raise ValueError(f"gguf={bad}: unknown GGUF type(s); expected any of {GGUF_QTYPES}")
        if not (Path(self.decoder) / "config.json").is_file():
            raise FileNotFoundError(f"decoder={self.decoder}: not a Hugging Face model directory (no config.json)")
        for p in self.plugins:
            if not (Path(p) / "plugin.json").is_file():
                raise FileNotFoundError(f"plugin folder {p}: no plugin.json (save it with save_plugin)")
        from autoglm_train.export.parity import tolerances

        tolerances(self.rtol)  # unknown keys or non-positive values fail here, not after the export
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise FileNotFoundError(f"chat_template={self.chat_template}: no such file")

    @property
    def forms(self) -> list[str]:
        return [
            "hf",
            *(["int8"] if self.int8 else []),
            *(f"gguf_{q}" for q in self.gguf),
            *(["onnx"] if self.onnx else []),
        ]


def export_bundle(opts: ExportOptions):
    """Write the bundle described by ``opts``; returns ``(bundle path, VerifyReport or None)``.

    Raises:
        BundleError: ``out`` exists (without ``overwrite``), is not a bundle, or a form failed parity.
    """
    from transformers import AutoTokenizer

    from autoglm_train.export.hf_dir import check_glm, write_hf_decoder
    from autoglm_train.export.progress import Steps
    from autoglm_train.model.chat_template import bundle_chat_template
    from autoglm_train.model.thinking import THINK_CLOSE, THINK_OPEN, template_thinks

    src, out = Path(opts.decoder).resolve(), Path(opts.out).resolve()
    _check_target(out, opts.overwrite)
    config = read_config(src)
    check_glm(config, src)
    name = opts.name or out.name
    steps = Steps(total=len(opts.forms) + bool(opts.plugins) + 1 + opts.verify, enabled=opts.progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        template = bundle_chat_template(tokenizer, Path(opts.chat_template).read_text() if opts.chat_template else None)
        plugin_metas = _check_plugins(opts.plugins, tokenizer, config, src)  # before any heavy work
        forms: dict[str, Any] = {}
        with steps.step(f"decoder/ ({opts.dtype}, transformers)"):
            forms["hf"] = write_hf_decoder(src, tmp / "decoder", opts.dtype, template)
        if opts.int8:
            with steps.step("int8/ (weight-only int8 safetensors; the run's measured student_int8/ if it fits)"):
                from autoglm_train.export.int8 import export_int8

                forms["int8"] = export_int8(src, tmp / "int8", tokenizer_dir=tmp / "decoder")
        for qtype in opts.gguf:
            with steps.step(f"gguf/model-{qtype}.gguf (llama.cpp)"):
                forms[f"gguf_{qtype}"] = _write_gguf(src, tmp, qtype, name, opts, steps)
        if opts.onnx:
            with steps.step("onnx/ (torch.onnx dynamo export)"):
                from autoglm_train.export.onnx_graph import write_onnx

                forms["onnx"] = write_onnx(src, tmp / "onnx")
        plugins = {}
        if opts.plugins:
            with steps.step(f"plugins/ ({len(opts.plugins)})"):
                plugins = _copy_plugins(plugin_metas, tmp / "plugins", _bundled_pin(tmp / "decoder", tokenizer))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"decoder": str(src), "plugins": {k: v["source"] for k, v in plugins.items()}},
            "modules": {"decoder": _decoder_module(config, tokenizer), "plugins": plugins},
            "forms": forms,
            "chat_template": {
                "file": "decoder/chat_template.jinja",
                "thinking": template_thinks(tokenizer, template),
                "think_tags": [THINK_OPEN, THINK_CLOSE],
                "switch": f"enable_thinking (default true); false emits an empty {THINK_OPEN}{THINK_CLOSE} block",
            },
            "versions": library_versions(),
        }
        _normalise_permissions(tmp)
        with steps.step("manifest.json (sha256 of every file)"):
            manifest = _write_manifest(tmp, manifest)
        report = None
        if opts.verify:
            with steps.step("verify parity with the training model"):
                from autoglm_train.export.verify import verify_bundle

                report = verify_bundle(tmp, reference=src, manifest=manifest, rtol=opts.rtol)
            if not report.passed:
                raise BundleError("export failed parity; no bundle written:\n" + report.table())
            manifest["parity"] = report.to_dict() | {"reference": str(src)}
            _write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
        return out, report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise BundleError(
            f"{out} exists and is not a bundle (no {MANIFEST}); refusing to replace it even with --overwrite"
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    """One rename when ``out`` is new; otherwise the old bundle is renamed aside first, then deleted."""
    tmp.chmod(0o755)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _normalise_permissions(root: Path) -> None:
    """Serving users other than the exporter must read the bundle (some writers create 0600 files)."""
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _write_gguf(src: Path, tmp: Path, qtype: str, name: str, opts: ExportOptions, steps) -> dict[str, Any]:
    from autoglm_train.export.gguf_writer import write_gguf
    from autoglm_train.model.hf_io import tensor_shapes

    (tmp / "gguf").mkdir(exist_ok=True)
    advance = steps.bar("tensors", total=len(tensor_shapes(src)))
    return write_gguf(src, tmp / "decoder", tmp / "gguf" / f"model-{qtype}.gguf", qtype, name, opts.gguf_pre, advance)


def _decoder_module(config: dict[str, Any], tokenizer) -> dict[str, Any]:
    from autoglm_train.export.hf_dir import head_dim, rope

    theta, factor = rope(config)
    return {
        "architecture": config["architectures"][0],
        "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": head_dim(config),
        "intermediate_size": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "tokenizer_size": len(tokenizer),
        "max_position_embeddings": config["max_position_embeddings"],
        "rope_theta": theta,
        "partial_rotary_factor": factor,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings")),
    }


def _check_plugins(folders: list[str], tokenizer, config: dict[str, Any], src: Path) -> dict[Path, dict[str, Any]]:
    """Each plugin folder's metadata, after checking the plugin fits this decoder (pin, placeholder, width, names)."""
    from autoglm_train.model.plugin_io import WEIGHTS_FILE, read_plugin_meta

    metas: dict[Path, dict[str, Any]] = {}
    seen: dict[str, Path] = {}
    vocab = tokenizer.get_vocab()
    for folder in (Path(f).resolve() for f in folders):
        meta = read_plugin_meta(folder)
        name = meta["name"]
        if name in seen:
            raise BundleError(f"two plugin folders are named '{name}': {seen[name]} and {folder}")
        if meta["placeholder"] not in vocab:
            raise BundleError(f"plugin {name} ({folder}): placeholder {meta['placeholder']!r} is not a decoder token")
        if meta["hidden_size"] != config["hidden_size"]:
            raise BundleError(
                f"plugin {name} ({folder}): projects to {meta['hidden_size']}, "
                f"decoder hidden size is {config['hidden_size']}"
            )
        if not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"plugin {name}: {folder / WEIGHTS_FILE} missing")
        _check_pin(folder, meta, tokenizer, src)
        seen[name], metas[folder] = folder, meta
    return metas


def _check_pin(folder: Path, meta: dict[str, Any], tokenizer, src: Path) -> None:
    """Refuse a plugin trained against another decoder: its artifact's pin (or ``plugin.json``'s fingerprint)."""
    from autoglm_train.model.decoder_dir import placeholder_ids
    from autoglm_train.model.manifest import artifact_pin
    from autoglm_train.model.pin import PluginMismatchError, check_pin, pin_decoder

    current = pin_decoder(src, placeholder_ids(tokenizer))
    try:
        check_pin(artifact_pin(folder) or meta.get("decoder_fingerprint"), current, f"plugin {meta['name']} ({folder})")
    except PluginMismatchError as err:
        raise BundleError(f"{err} (export refused)") from None


def _bundled_pin(decoder_dir: Path, tokenizer) -> dict[str, Any]:
    """The pin of the decoder as the bundle ships it (dtype-converted: other weight bytes than the source's).

    Each plugin's entry records it once the plugin's own pin has matched the source decoder: the server then
    checks the bundle's ``decoder/`` against it, weights included, without trusting an unverified file table.
    """
    from dataclasses import replace

    from autoglm_train.model.decoder_dir import placeholder_ids
    from autoglm_train.model.pin import pin_decoder

    return replace(pin_decoder(decoder_dir, placeholder_ids(tokenizer)), path=decoder_dir.name).to_dict()


def _copy_plugins(
    metas: dict[Path, dict[str, Any]], dest: Path, decoder_pin: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Copy each plugin's artifact files as they are (bit-identical); returns the manifest's plugin entries.

    Only the artifact's own files travel: ``plugin.json``, ``model.safetensors`` and, for artifacts written by
    ``recipe=add_modality``, their ``manifest.json`` (the decoder pin); anything else in the folder stays behind.
    """
    from safetensors import safe_open

    from autoglm_train.model.plugin_io import CONFIG_FILE, WEIGHTS_FILE

    plugins: dict[str, dict[str, Any]] = {}
    for folder, meta in metas.items():
        name = meta["name"]
        (dest / name).mkdir(parents=True)
        for file in (CONFIG_FILE, WEIGHTS_FILE, PLUGIN_ARTIFACT_MANIFEST):
            if (folder / file).is_file():
                shutil.copyfile(folder / file, dest / name / file)
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118 - safe_open is not a mapping
            dtypes = sorted({sl.get_dtype() for sl in slices})
            params = sum(math.prod(sl.get_shape()) for sl in slices)
        plugins[name] = {
            "path": f"plugins/{name}",
            "target": meta["_target_"],
            "placeholder": meta["placeholder"],
            "num_tokens": meta["num_tokens"],
            "dtype": dtypes,
            "params": params,
            "decoder_fingerprint": meta.get("decoder_fingerprint"),
            "decoder_pin": decoder_pin,
            "loader": "autoglm_train.model.plugin_io.load_plugin",
            "source": str(folder),
        }
    return plugins
