"""Command lines behind ``tools/export/export.py`` and ``tools/export/verify.py`` (argparse).

Both return a process exit code, so tests call ``export_main([...])`` directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from autoglm_train.export.bundle import GGUF_QTYPES, ExportOptions, export_bundle
from autoglm_train.export.manifest import BundleError


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/export/export.py",
        description="Turn a run's student decoder (+ plugins) into a serving bundle checked against training.",
    )
    p.add_argument(
        "--decoder", required=True, help="the run's student dir (plain HF GLM, e.g. outputs/distill/student)"
    )
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--plugin", action="append", default=[], metavar="DIR", help="plugin folder to ship (repeatable)")
    p.add_argument("--name", help="model name for the manifest and GGUF metadata (default: the --out folder name)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"], help="decoder/ dtype")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8/ form")
    p.add_argument(
        "--gguf",
        default=",".join(GGUF_QTYPES),
        help=f"comma-separated GGUF types to write, from {','.join(GGUF_QTYPES)}; 'none' for none",
    )
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnx/ form")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the parity check (checksums still written)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to ship instead of the built-in one")
    p.add_argument("--gguf-pre", metavar="NAME", help="llama.cpp pre-tokenizer name for an unrecognised tokenizer")
    _add_rtol(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _add_rtol(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rtol",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="parity tolerance override, e.g. hf:bfloat16=0.08 (keys: hf:float32, hf:float16, hf:bfloat16, int8, "
        "gguf_f16, gguf_q8_0, onnx); repeatable",
    )


def _parse_rtol(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--rtol {item!r}: expected KEY=VALUE, e.g. hf:bfloat16=0.08") from None
    return out


def export_main(argv: Sequence[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    gguf = [] if args.gguf.strip().lower() in {"", "none"} else [q.strip() for q in args.gguf.split(",")]
    try:
        opts = ExportOptions(
            decoder=args.decoder,
            out=args.out,
            plugins=args.plugin,
            name=args.name,
            dtype=args.dtype,
            int8=args.int8,
            gguf=gguf,
            onnx=args.onnx,
            verify=args.verify,
            overwrite=args.overwrite,
            chat_template=args.chat_template,
            gguf_pre=args.gguf_pre,
            progress=not args.quiet,
            rtol=_parse_rtol(args.rtol),
        )
        out, report = export_bundle(opts)
    except (BundleError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if report is not None:
        print(report.table())
    print(f"bundle written: {out}")
    return 0


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/export/verify.py",
        description="Check a bundle's files against its manifest and each form's parity with the training model.",
    )
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--reference", metavar="DIR", help="fp32 decoder to compare with (default: the manifest's source)")
    p.add_argument(
        "--form", action="append", metavar="NAME", help="only this form (repeatable): hf, int8, gguf_f16, ..."
    )
    p.add_argument("--checksums-only", action="store_true", help="only compare files with the manifest")
    p.add_argument("--strict", action="store_true", help="a form whose consumer is not installed is a failure")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_rtol(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def verify_main(argv: Sequence[str] | None = None) -> int:
    from autoglm_train.export.manifest import check_files
    from autoglm_train.export.verify import verify_bundle

    args = verify_parser().parse_args(argv)
    try:
        if args.checksums_only:
            print(f"{check_files(args.bundle)} files match the manifest")
            return 0
        report = verify_bundle(
            args.bundle,
            reference=args.reference,
            forms=args.form,
            progress=not args.quiet,
            rtol=_parse_rtol(args.rtol),
        )
    except (BundleError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if not report.passed:
        print("FAILED:\n  " + "\n  ".join(report.failures()), file=sys.stderr)
        return 1
    if args.strict and report.skipped:
        print(f"FAILED (--strict): skipped {sorted(report.skipped)}", file=sys.stderr)
        return 1
    print(f"OK: {report.files_checked} files match the manifest; {len(report.forms)} form(s) within tolerance")
    return 0
