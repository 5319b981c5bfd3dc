"""Verify a serving bundle: checksums, then every form against the training model via its real consumer."""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_train.export.manifest import check_files, read_manifest
from autoglm_train.export.parity import (
    FormReport,
    LlamaCppRunner,
    OnnxRunner,
    Reference,
    Tolerance,
    TorchRunner,
    compare,
    reference_answers,
    tolerances,
)
from autoglm_train.export.progress import Steps

# The package each form's consumer needs; a missing one skips the form with this reason.
CONSUMERS = {
    "hf": ("transformers", "transformers"),
    "int8": ("torchao", "transformers + torchao"),
    "gguf_f16": ("llama_cpp", "llama-cpp-python"),
    "gguf_q8_0": ("llama_cpp", "llama-cpp-python"),
    "onnx": ("onnxruntime", "onnxruntime"),
}
INSTALL_HINT = {
    "llama_cpp": "pip install llama-cpp-python",
    "onnxruntime": "pip install 'autoglm-train[export]'",
    "torchao": "pip install 'autoglm-train[quant]'",
}


@dataclass
class VerifyReport:
    """What :func:`verify_bundle` found."""

    bundle: str
    files_checked: int
    reference: str
    forms: list[FormReport] = field(default_factory=list)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> {"ok": bool, "detail": str}"""
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.forms) and all(p["ok"] for p in self.plugins.values())

    def failures(self) -> list[str]:
        forms = [
            f"{f.form} ({f.consumer}): {'; '.join(f.notes) or 'outside tolerance'}" for f in self.forms if not f.passed
        ]
        return forms + [f"plugin {n}: {p['detail']}" for n, p in self.plugins.items() if not p["ok"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "files_checked": self.files_checked,
            "passed": self.passed,
            "forms": {f.form: f.to_dict() for f in self.forms},
            "plugins": self.plugins,
            "skipped": self.skipped,
        }

    def table(self) -> str:
        """A plain-text table of the parity numbers."""
        rows = [
            f"{'form':<10} {'consumer':<37} {'max|Δ|':>8} {'rel':>8} {'top-1':>6} {'decisive':>8} {'greedy':>6}  result"
        ]
        for f in self.forms:
            rows.append(
                f"{f.form:<10} {f.consumer:<37} {f.max_abs_logit_diff:>8.2e} {f.max_rel_logit_diff:>8.2e} "
                f"{f.top1_agreement:>6.1%} {f.decisive_top1_agreement:>8.1%} {f.greedy_agreement:>6.1%}  "
                f"{'PASS' if f.passed else 'FAIL'}"
            )
        rows += [f"{name:<11} skipped: {why}" for name, why in self.skipped.items()]
        rows += [f"plugin {n}: {p['detail']}  {'PASS' if p['ok'] else 'FAIL'}" for n, p in self.plugins.items()]
        return "\n".join(rows)


def verify_bundle(
    bundle: str | Path,
    reference: str | Path | None = None,
    forms: list[str] | None = None,
    progress: bool = False,
    manifest: dict[str, Any] | None = None,
    rtol: dict[str, float] | None = None,
) -> VerifyReport:
    """Check every file against the manifest, then each form's parity with the reference decoder.

    Args:
        bundle: the bundle directory.
        reference: the fp32 decoder training wrote; default: the manifest's source decoder if it still
            exists, else the bundle's own ``decoder/`` (then HF parity is trivially exact).
        forms: only these forms (default: every form in the manifest).
        progress: print step-by-step progress.
        manifest: an already-read manifest (the exporter passes the one it is about to write).
        rtol: tolerance overrides by key (``hf:bfloat16``, ``int8``, ``gguf_q8_0``, ...); see ``parity.TOLERANCES``.

    Raises:
        BundleIntegrityError: a file is missing, unexpected or altered — before any model is loaded.
    """
    from transformers import AutoTokenizer

    from autoglm_train.export.hf_dir import load_reference

    bundle = Path(bundle)
    table = tolerances(rtol)  # a bad key fails before any file is read
    manifest = manifest or read_manifest(bundle)
    n_files = check_files(bundle, manifest)
    names = [f for f in manifest["forms"] if forms is None or f in forms]
    ref_dir = _reference_dir(bundle, manifest, reference)
    report = VerifyReport(str(bundle), n_files, str(ref_dir))
    steps = Steps(total=1 + len(names) + bool(manifest["modules"].get("plugins")), enabled=progress)

    with steps.step(f"reference answers from {ref_dir}"):
        tokenizer = AutoTokenizer.from_pretrained(str(bundle / manifest["forms"]["hf"]["path"]))
        model = load_reference(ref_dir)
        ref = reference_answers(model, tokenizer)
        del model
    for name in names:
        module, consumer = CONSUMERS[name]
        if importlib.util.find_spec(module) is None:
            report.skipped[name] = f"{consumer} not installed ({INSTALL_HINT.get(module, 'pip install ' + module)})"
            continue
        with steps.step(f"{name} via {consumer}"):
            report.forms.append(_check_form(bundle, name, manifest["forms"][name], ref, table))
        if name in {"hf", "int8"}:
            gc.collect()  # a 9B torch model must be gone before the next form loads
    if manifest["modules"].get("plugins"):
        with steps.step("plugins"):
            report.plugins = _check_plugins(bundle, manifest)
    return report


def _reference_dir(bundle: Path, manifest: dict[str, Any], reference: str | Path | None) -> Path:
    if reference is not None:
        return Path(reference)
    source = Path(manifest.get("source", {}).get("decoder", ""))
    if source.is_dir() and (source / "config.json").is_file():
        return source
    return bundle / manifest["forms"]["hf"]["path"]


def _check_form(
    bundle: Path, name: str, entry: dict[str, Any], ref: Reference, table: dict[str, Tolerance]
) -> FormReport:
    path = bundle / entry["path"]
    if name == "hf":
        from transformers import AutoModelForCausalLM

        # Exactly what a user without this project runs: no project code, the dtype the config states.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", use_safetensors=True)
        return compare(name, f"transformers ({entry['dtype']})", TorchRunner(model), ref, table[f"hf:{entry['dtype']}"])
    if name == "int8":
        from autoglm_train.quant.int8_layout import load_int8

        # As a user loads it: transformers alone reads the torchao quantization_config; weights stay int8.
        return compare(name, "transformers (TorchAoConfig int8)", TorchRunner(load_int8(path)), ref, table[name])
    if name == "onnx":
        return compare(name, "onnxruntime (CPU)", OnnxRunner(path), ref, table[name])
    if name.startswith("gguf_"):
        runner = LlamaCppRunner(path, n_ctx=max(len(x) for x in ref.ids) + 64)
        try:
            report = compare(name, "llama-cpp-python", runner, ref, table[name])
            mismatched = [t for t, ids in zip(ref.texts, ref.ids, strict=True) if runner.tokenize(t) != ids]
        finally:
            runner.close()
        if mismatched:
            report.passed = False
            report.notes.append(f"llama.cpp tokenizes {len(mismatched)} prompt(s) differently, e.g. {mismatched[0]!r}")
        return report
    raise ValueError(f"unknown form {name!r} in manifest; known: {sorted(CONSUMERS)}")


def _check_plugins(bundle: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each plugin rebuilds from its bundle folder alone, with exactly the source's weights when that still exists."""
    import torch
    from safetensors.torch import load_file

    from autoglm_train.model.plugin_io import WEIGHTS_FILE, load_plugin

    status = {}
    for name, entry in manifest["modules"]["plugins"].items():
        try:
            plugin = load_plugin(bundle / entry["path"])
        except Exception as err:  # any failure to rebuild is this plugin's verdict, not a crash
            status[name] = {"ok": False, "detail": f"does not load: {err}"}
            continue
        params = sum(p.numel() for p in plugin.parameters())
        source = Path(entry.get("source") or "/nonexistent")
        if not (source / WEIGHTS_FILE).is_file():
            status[name] = {"ok": True, "detail": f"loads ({params:,} params); source folder gone, not compared"}
            continue
        src = load_file(str(source / WEIGHTS_FILE))
        same = src.keys() == plugin.state_dict().keys() and all(
            torch.equal(v, src[k]) for k, v in plugin.state_dict().items()
        )
        detail = "identical to source" if same else "weights differ from source"
        status[name] = {"ok": same, "detail": f"loads ({params:,} params); {detail}"}
    return status
