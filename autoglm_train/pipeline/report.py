"""The run report: report.md + report.html + PNG curves + report.json, written to ``<root>/report/``.

    python -m autoglm_train.pipeline.report --root outputs/demo

Every number is read from what the stages wrote (run_summary.json, the CSV logs, compare.json,
the bundle manifest, the server evaluation); report.json lists each table cell with its value and
the ``file#key`` it came from. Sections whose stage has not run say so, so a partial run reports too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from autoglm_train.pipeline.assistant_report import ASSISTANT_PREFIXES, assistant_section
from autoglm_train.pipeline.plan import STAGES
from autoglm_train.pipeline.plots import distill_curves, plugin_curves
from autoglm_train.pipeline.render import (
    Cell,
    Code,
    Document,
    Figure,
    Heading,
    Para,
    Table,
    cell,
    fmt,
    fmt_mb,
    text,
    to_html,
    to_markdown,
)
from autoglm_train.pipeline.sources import read_json, read_metrics

QUALITY_CURVES = Path(__file__).resolve().parents[2] / "benchmarks" / "distill_quality_curves.png"
"""The recipe comparison behind the default distillation (benchmarks/distill_quality_bench.py), when present."""

PLUGINS = ("vision", "speech")
COMPARE_COLUMNS = ["model", "params", "weights", "ppl", "KL(teacher‖·) nats/tok", "top-1 agree w/ teacher"]
COMPARE_COLUMNS += ["decode tok/s", "prefill ms"]


# --- sections -----------------------------------------------------------------------------------------------------
def stages_section(doc: Document, root: Path) -> None:
    state = read_json(root / "pipeline.json") or {"stages": {}}
    rows, total = [], 0.0
    for name in (n for n in STAGES if n in state["stages"] and n != "report"):  # the report is being written now
        entry = state["stages"][name]
        seconds = entry.get("seconds")
        total += seconds or 0.0
        log = Path(entry["log"]).name if entry.get("log") else "–"
        rows.append(
            [
                text(name),
                text(entry.get("status", "?")),
                cell(state, f"stages.{name}.seconds", "pipeline.json"),
                cell(state, f"stages.{name}.cpu_seconds", "pipeline.json"),
                text(log),
            ]
        )
    doc.add(Heading("Stages"))
    if rows:
        doc.add(
            Table(
                ["stage", "status", "wall s", "CPU s", "log (logs/)"],
                rows,
                "stages",
                f"Sum of stage times: {total / 60:.1f} min (each stage's last run; skipped stages keep their time). "
                "CPU s is what the stage's processes used: on an idle 2-core machine wall is at best CPU s / 2; "
                "much more wall means other jobs shared the cores.",
            )
        )
    else:
        doc.add(Para("No pipeline.json: this report was built from run folders alone."))


def distill_section(doc: Document, root: Path, figures: Path) -> None:
    run = root / "distill"
    summary = read_json(run / "run_summary.json")
    compared = read_json(root / "eval" / "compare.json")
    doc.add(Heading("Distillation: teacher vs student vs int8 student"))
    if summary is None:
        doc.add(Para("Not run yet (stage `distill`)."))
        return
    if compared is not None:
        src = "eval/compare.json"
        rows = []
        for name, label in (("teacher", "teacher"), ("student", "student (fp32)"), ("student_int8", "student int8")):
            m = f"models.{name}."
            rows.append(
                [
                    text(label),
                    cell(compared, m + "params", src),
                    cell(compared, m + "weight_bytes", src, fmt_mb),
                    cell(compared, m + "ppl", src),
                    cell(compared, m + "kl_to_teacher", src),
                    cell(compared, m + "top1_agreement_with_teacher", src),
                    cell(compared, m + "decode_tps", src),
                    cell(compared, m + "prefill_ms", src),
                ]
            )
        held, speed = compared["held_out"], compared["speed"]
        doc.add(
            Table(
                COMPARE_COLUMNS,
                rows,
                "compare",
                f"Held-out: {held['tokens']:,} tokens ({held['blocks']} blocks of {held['seq_len']}) of the distill "
                f"run's validation split; int8 = the run's `student_int8/` (`{compared['int8_scheme']}` PTQ of the "
                "student, the TorchAoConfig form the bundle ships), loaded from disk. KL and "
                "agreement over the teacher's vocabulary. Speed: greedy decode of "
                f"{speed['new_tokens']} tokens after a {speed['prompt_tokens']}-token prompt, batch 1, best of "
                f"{speed['repeats']}, {speed['threads']} threads. Source: `eval/compare.json`.",
            )
        )
    else:
        doc.add(Para("Teacher/student/int8 comparison not run yet (stage `compare`)."))
    src = "distill/run_summary.json"
    keys = [
        ("global_step", "optimizer steps"),
        ("val/loss", "val/loss"),
        ("val/ppl", "val/ppl (student)"),
        ("val/kl_to_teacher", "val/kl_to_teacher"),
        ("val/teacher_top1_agreement", "val/teacher_top1_agreement"),
        ("ptq/scheme", "int8 scheme"),
        ("ptq/float_ppl", "ptq/float_ppl (student, PTQ eval batches)"),
        ("ptq/ppl", "ptq/ppl (int8 student)"),
        ("ptq/kl_to_float", "ptq/kl_to_float"),
        ("ptq/top1_agreement_with_float", "ptq/top1_agreement_with_float"),
        ("ptq/weight_bytes_ratio", "ptq/weight_bytes_ratio (int8 / fp32)"),
    ]
    rows = [[text(label), cell(summary, key, src)] for key, label in keys if key in summary]
    rows.insert(-1, [text("ptq/weight_bytes"), cell(summary, "ptq/weight_bytes", src, fmt_mb)])
    doc.add(
        Para("Training-time numbers, as the distill run recorded them (`distill/run_summary.json`):"),
        Table(["metric", "value"], rows, "distill_summary"),
    )
    png = distill_curves(read_metrics(run), figures / "distill.png")
    if png:
        doc.add(Figure(png.name, "Distillation: training losses; validation agreement with and KL to the teacher."))
    if summary.get("samples"):
        doc.add(Para("Greedy samples of the student:"))
        doc.add(Code("\n".join(f"{p!r} → {s!r}" for p, s in summary["samples"].items())))
    if QUALITY_CURVES.is_file():
        shutil.copyfile(QUALITY_CURVES, figures / QUALITY_CURVES.name)
        doc.add(
            Figure(
                QUALITY_CURVES.name,
                "Why this recipe (from the repository's `benchmarks/distill_quality_bench.py`, not from this run): "
                "held-out KL to the teacher against training seconds for CE only, forward KL from random init, "
                "on-policy λ=0.5, teacher-initialised student + KD, and both; equal training time per arm on 2 "
                "CPU cores (benchmarks/RESULTS.md).",
            )
        )


# The served score of each plugin (eval/server.json), shown next to its training-time held-out score
SERVED = {"vision": "vision/digit_accuracy", "speech": "speech/wer"}


def plugins_section(doc: Document, root: Path, figures: Path) -> None:
    doc.add(Heading("Modality plugins (decoder frozen)"))
    summaries = {name: read_json(root / name / "run_summary.json") for name in PLUGINS}
    ran = {name: s for name, s in summaries.items() if s is not None}
    if not ran:
        doc.add(Para("Not run yet (stages `vision`, `speech`)."))
        return
    metrics = {name: read_metrics(root / name) for name in ran}
    keys = [
        ("global_step", "steps"),
        ("wall_time_s", "wall time (s)"),
        ("test/items", "held-out items"),
        ("test/digit_accuracy", "held-out digit accuracy"),
        ("test/wer", "held-out WER"),
        ("test/cer", "held-out CER"),
        ("test/accuracy", "held-out exact match"),
        ("test/gate_{p}", "gate (mean over held-out)"),
        ("decoder_verified_unchanged", "decoder weights unchanged (hashed)"),
        ("text_only_unchanged", "text-only output unchanged"),
    ]
    rows = []
    for key, label in keys:
        row = [text(label)]
        for name, s in ran.items():
            k = key.format(p=name)
            row.append(cell(s, k, f"{name}/run_summary.json") if k in s else text("–"))
        rows.append(row)
    served = read_json(root / "eval" / "server.json") or {}
    served_rows = (("counts", "served items (OpenAI API)"), ("metrics", "served digit accuracy / WER (OpenAI API)"))
    for field, label in served_rows:
        row = [text(label)]
        for name in ran:
            value = (served.get(field) or {}).get(SERVED[name])
            where = f"eval/server.json#{field}.{SERVED[name]}"
            row.append(Cell(fmt(value), value, where) if value is not None else text("–"))
        rows.append(row)
    gate_row = [text("gate, last training step")]
    for name in ran:
        series = metrics[name].get(f"train/gate_{name}")
        gate_row.append(
            Cell(fmt(series[-1][1]), series[-1][1], f"{name}/logs#train/gate_{name}") if series else text("–")
        )
    rows.append(gate_row)
    doc.add(
        Table(
            ["metric", *ran],
            rows,
            "plugins",
            "Held-out: greedy generation on each run's held-out split through the saved plugin artifact and the "
            "serving engine, prompted as a chat client is (text, then media; the plugin's recorded prompt format). "
            "Served: the same items asked through `/v1/chat/completions` of the exported bundle. Sources: "
            "`<plugin>/run_summary.json`, `eval/server.json`.",
        )
    )
    png = plugin_curves(metrics, figures / "plugins.png")
    if png:
        doc.add(Figure(png.name, "Plugins: training loss, gate value, validation metrics."))
    for name, s in ran.items():
        samples = s.get("samples") or []
        if samples:
            shown = "\n".join(f"{x['reference']!r} → {x['output']!r}" for x in samples[:4])
            doc.add(Para(f"{name} held-out samples (reference → output):"), Code(shown))


def server_section(doc: Document, root: Path) -> None:
    doc.add(Heading("Through the server (OpenAI-compatible API)"))
    result = read_json(root / "eval" / "server.json")
    if result is None:
        doc.add(Para("Not run yet (stage `serve_eval`)."))
        return
    src = "eval/server.json"
    rows = [
        [
            text(r["metric"]),
            Cell(fmt(r["value"]), r["value"], f"{src}#metrics.{r['metric']}"),
            text(f"{r['count']:,}"),
            text(f"{r['seconds']:.1f}"),
            text(r.get("note", "")),
        ]
        for r in result["rows"]
        if not r["metric"].startswith(ASSISTANT_PREFIXES)  # those have their own section
    ]
    doc.add(
        Table(
            ["metric", "value", "n", "seconds", "note"],
            rows,
            "server",
            f"`tools/eval_server.py` against `python -m autoglm_train.serve` serving `bundle/` as "
            f"'{result['model']}': perplexity from `/v1/completions` prompt logprobs, digits through chat `image_url` "
            "parts, speech through `input_audio` parts, on each plugin run's held-out items with its own question and "
            "budget. The plugins were trained on exactly these chat prompts (their recorded prompt format), so the "
            "served scores should match the held-out ones above; the bundle's bf16 decoder is the only difference "
            "(clips go as 32-bit PCM WAV, the training samples exactly).",
        )
    )


def export_section(doc: Document, root: Path) -> None:
    doc.add(Heading("Export bundle and parity"))
    manifest = read_json(root / "bundle" / "manifest.json")
    if manifest is None:
        doc.add(Para("Not run yet (stage `export`)."))
        return
    src = "bundle/manifest.json"
    parity = manifest.get("parity") or {}
    rows = []
    for form, r in (parity.get("forms") or {}).items():
        p = f"parity.forms.{form}."
        rows.append(
            [
                text(form),
                text(r["consumer"]),
                cell(manifest, p + "max_rel_logit_diff", src),
                cell(manifest, p + "top1_agreement", src),
                cell(manifest, p + "greedy_agreement", src),
                Cell("PASS" if r["passed"] else "FAIL", r["passed"], f"{src}#{p}passed"),
            ]
        )
    rows += [
        [text(form), text(f"skipped: {why}"), text(""), text(""), text(""), text("–")]
        for form, why in (parity.get("skipped") or {}).items()
    ]
    rows += [
        [
            text(f"plugin {n}"),
            text(p.get("detail", "")),
            text(""),
            text(""),
            text(""),
            text("PASS" if p["ok"] else "FAIL"),
        ]
        for n, p in (parity.get("plugins") or {}).items()
    ]
    sizes: dict[str, int] = {}
    for rel, meta in manifest.get("files", {}).items():
        top = rel.split("/")[0] if "/" in rel else rel
        top = "/".join(rel.split("/")[:2]) if top == "plugins" else top
        sizes[top] = sizes.get(top, 0) + meta["bytes"]
    doc.add(
        Table(
            ["form", "consumer", "max rel Δlogit", "top-1 agree", "greedy agree", "result"],
            rows,
            "parity",
            "Each form against the fp32 training student on fixed prompts, through its real consumer "
            "(`tools/export/verify.py` re-checks any time). Source: `bundle/manifest.json` (`parity`).",
        ),
        Para("Bundle contents: " + ", ".join(f"`{k}/` {v / 1e6:.1f} MB" for k, v in sorted(sizes.items())) + "."),
    )


def build(root: Path) -> Document:
    """The report's document; writes the figures into ``root/report`` on the way."""
    figures = root / "report"
    figures.mkdir(parents=True, exist_ok=True)
    state = read_json(root / "pipeline.json") or {}
    profile = (state.get("options") or {}).get("profile", "?")
    doc = Document("autoglm-train run report")
    doc.add(
        Para(
            f"Run folder `{root}`, profile `{profile}`, built {time.strftime('%Y-%m-%d %H:%M')}. "
            "Every number below is read from the stages' own outputs (paths relative to the run folder)."
        )
    )
    stages_section(doc, root)
    distill_section(doc, root, figures)
    plugins_section(doc, root, figures)
    export_section(doc, root)
    server_section(doc, root)
    assistant_section(doc, root)
    return doc


def write_report(root: Path) -> Path:
    """report.md, report.html and report.json under ``root/report``; returns report.md's path."""
    doc = build(root)
    out = root / "report"
    (out / "report.html").write_text(to_html(doc))
    (out / "report.json").write_text(json.dumps({"tables": doc.tables()}, indent=2, default=str) + "\n")
    md = out / "report.md"
    md.write_text(to_markdown(doc))
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m autoglm_train.pipeline.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, type=Path, help="the pipeline's output folder")
    args = p.parse_args(argv)
    print(f"report written: {write_report(args.root)}")


if __name__ == "__main__":
    main()
