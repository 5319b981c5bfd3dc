"""Server overhead vs plain ``transformers`` generate, and text-only cost with plugins unloaded vs loaded.

    python benchmarks/serve_overhead.py --bundle DIR [--tokens 64] [--repeats 5] [--out benchmarks/RESULTS-serve.md]

Same model, same greedy decoding, same fixed length (``ignore_eos``):
- **TTFT**: request sent → first streamed token (server) vs ``generate(max_new_tokens=1)`` (transformers);
- **decode tokens/s**: tokens after the first / time after the first;
- **plugins**: text-only latency and process memory (RSS) before any plugin is loaded, then again after
  one image/audio request has loaded the plugins (text traffic should not get slower).
The server runs in-process under uvicorn on 127.0.0.1 and is driven over real HTTP with streaming.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import statistics
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import torch

from autoglm_train.serve.app import create_app
from autoglm_train.serve.bundle import read_bundle
from autoglm_train.serve.config import ServerConfig
from autoglm_train.serve.engine import Engine
from autoglm_train.serve.local import running_server

KEY = "bench"
PROMPT = "The history of the city begins"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_generate(engine: Engine, ids: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    """(TTFT s, decode tok/s) of plain ``generate`` on the engine's own decoder."""
    x = torch.tensor([ids], device=engine.device)
    kwargs = dict(do_sample=False, min_new_tokens=0, pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=None)
    ttft, total = [], []
    with torch.inference_mode():
        engine.decoder.generate(x, max_new_tokens=4, **kwargs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            engine.decoder.generate(x, max_new_tokens=1, **kwargs)
            ttft.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = engine.decoder.generate(x, max_new_tokens=tokens, **kwargs)
            total.append(time.perf_counter() - start)
            assert out.shape[1] - x.shape[1] == tokens
    first, whole = statistics.median(ttft), statistics.median(total)
    return first, (tokens - 1) / max(whole - first, 1e-9)


def server_stream(http: httpx.Client, model: str, tokens: int, repeats: int) -> tuple[float, float]:
    """(TTFT s, decode tok/s) through ``/v1/completions`` streaming."""
    # logprobs=0 makes every token a chunk, even one that adds no text (a special token)
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    body["logprobs"] = 0
    ttft, rate = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        first = last = None
        count = 0
        with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
                if logprobs and logprobs["tokens"]:
                    last = time.perf_counter()
                    first = first or last
                    count += len(logprobs["tokens"])
        if i == 0:
            continue  # warm-up
        ttft.append(first - start)
        rate.append((count - 1) / max(last - first, 1e-9))
    return statistics.median(ttft), statistics.median(rate)


def text_latency(http: httpx.Client, model: str, repeats: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        http.post("/v1/completions", json=body).raise_for_status()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def media_parts() -> dict[str, dict]:
    """One noise image (PNG data URL) and one noise clip (16 kHz WAV) as chat content parts."""
    from PIL import Image

    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((rng.standard_normal(8000) * 3000).astype(np.int16).tobytes())
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return {
        "image_url": {"type": "image_url", "image_url": {"url": image}},
        "input_audio": {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode()}},
    }


def load_plugins(http: httpx.Client, model: str, engine: Engine) -> list[str]:
    parts = media_parts()
    for kind in engine.slots:
        message = [{"role": "user", "content": [{"type": "text", "text": "?"}, parts[kind]]}]
        http.post(
            "/v1/chat/completions", json={"model": model, "messages": message, "max_tokens": 1}
        ).raise_for_status()
    return [name for name, device in engine.loaded_modules().items() if device and name != "decoder"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the markdown table here too")
    args = p.parse_args()

    engine = Engine(read_bundle(args.bundle), device=args.device)
    ids = engine.encode(PROMPT)
    hf_ttft, hf_rate = hf_generate(engine, ids, args.tokens, args.repeats)
    app = create_app(ServerConfig(bundle=args.bundle, api_keys=[KEY], rate_limit=None), engine)
    model = app.state.server.model_name
    with running_server(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        sv_ttft, sv_rate = server_stream(http, model, args.tokens, args.repeats)
        rss_before, lat_before = rss_mib(), text_latency(http, model, args.repeats)
        loaded = load_plugins(http, model, engine)
        rss_after, lat_after = rss_mib(), text_latency(http, model, args.repeats)

    overhead = 100 * (hf_rate / sv_rate - 1)
    lines = [
        f"# Server overhead ({engine.device}, {args.tokens} tokens, median of {args.repeats})",
        "",
        "| | TTFT (ms) | decode tok/s |",
        "|---|---|---|",
        f"| transformers generate | {1000 * hf_ttft:.1f} | {hf_rate:.1f} |",
        f"| server (HTTP + SSE) | {1000 * sv_ttft:.1f} | {sv_rate:.1f} |",
        "",
        f"Decode overhead of the server: {overhead:+.1f}% (target <= 10%).",
        "",
        "| text-only request (16 tokens) | latency (ms) | peak RSS (MiB) |",
        "|---|---|---|",
        f"| plugins unloaded | {1000 * lat_before:.1f} | {rss_before:.0f} |",
        f"| plugins loaded ({', '.join(loaded) or 'none in bundle'}) | {1000 * lat_after:.1f} | {rss_after:.0f} |",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_section

    write_section("Server overhead", "\n".join(lines[2:]), script=f"serve_overhead.py --bundle {args.bundle}")


if __name__ == "__main__":
    main()
