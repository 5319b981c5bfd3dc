"""``python -m autoglm_train.serve --bundle DIR | --decoder HF_DIR [--host H --port P --api-key KEY ...]``.

``--bundle`` serves an exported bundle (decoder + plugins); ``--decoder`` any causal LM directory, e.g. a
distillation teacher whose prompt log-probs by token id (``--max-logprobs``) fill the student's top-k cache.

Loads the bundle, logs which module sits where, starts uvicorn, and logs one ready line with the
URL once the socket accepts connections.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from autoglm_train.serve.config import NO_AUTH_KEY, ServerConfig

log = logging.getLogger("autoglm_train.serve")

KEY_ENV = "AUTOGLM_API_KEY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m autoglm_train.serve",
        description="OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions) for a bundle.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="bundle dir (tools/export output: manifest.json, decoder/, plugins/)")
    source.add_argument(
        "--decoder",
        help="any causal LM directory (config.json + weights + tokenizer), no bundle needed: e.g. a distillation "
        "teacher answering prompt log-probs by token id",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"accepted bearer key (repeatable; also ${KEY_ENV}, comma-separated); '{NO_AUTH_KEY}' = no auth",
    )
    p.add_argument("--api-key-file", help="file with one accepted key per line (keeps keys out of `ps`)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (local experiments only)")
    p.add_argument("--model-name", help="served model id (default: the manifest's model_name or the folder name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8"], help="int8: torchao weight-only int8 linear layers")
    p.add_argument(
        "--rate-limit", default="120/minute", help="per-key limit, e.g. '10/second;500/hour'; 'none' disables"
    )
    p.add_argument(
        "--max-body-mb", type=float, default=16.0, help="largest request body (images/audio are base64 inside)"
    )
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the decoder's context)")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-concurrency", type=int, default=16, help="generations in progress at once")
    p.add_argument(
        "--max-logprobs", type=int, default=20, help="largest logprobs / prompt_logprobs a completion may ask for"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--verify-checksums", action="store_true", help="check bundle files against manifest sha256 first")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.decoder and not (Path(args.decoder).expanduser() / "config.json").is_file():
        raise ValueError(f"--decoder {args.decoder}: no config.json there (a causal LM directory; bundles: --bundle)")
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get(KEY_ENV, "").split(",") if k.strip()]
    if args.api_key_file:
        keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
    same_name = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if f.name in vars(args)}
    return ServerConfig(
        **{
            **same_name,  # host, port, no_auth, model_name, device, dtype, quantize, max_logprobs, threads, ...
            "bundle": args.bundle or args.decoder,
            "api_keys": keys,
            "rate_limit": None if args.rate_limit.lower() in ("none", "0", "off") else args.rate_limit,
            "max_body_bytes": int(args.max_body_mb * 1024 * 1024),
            "max_tokens_cap": args.max_tokens,
        }
    )


def startup_lines(config: ServerConfig, app) -> list[str]:
    """What the operator must know before the first request: modules and where, auth, limits."""
    from autoglm_train.serve.security import key_id

    state = app.state.server
    bundle = state.engine.bundle
    manifest = bundle.manifest or {}
    kind = (
        f"bundle ({manifest.get('format', 'manifest')} v{manifest.get('format_version', '?')})"
        if manifest
        else "decoder dir"
    )
    lines = [f"serving {kind} {bundle.root} as model '{state.model_name}'"]
    lines += state.engine.describe()
    if config.no_auth:
        lines.append("auth: NONE")
    else:
        lines.append(f"auth: {len(config.api_keys)} API key(s) [{', '.join(key_id(k) for k in config.api_keys)}]")
    lines.append(
        f"limits: {config.rate_limit or 'no rate limit'} per key | body {config.max_body_bytes / 2**20:.0f} MiB | "
        f"max_tokens {config.max_tokens_cap} | {config.max_concurrency} concurrent generations"
    )
    return lines


def log_startup(config: ServerConfig, app) -> None:
    for line in startup_lines(config, app):
        log.info(line)
    if config.no_auth:
        log.warning("!" * 78)
        log.warning("!! NO AUTHENTICATION: anyone who can reach %s:%d can use this model.", config.host, config.port)
        log.warning("!! Started with --no-auth / --api-key %s. Never expose this to a network.", NO_AUTH_KEY)
        log.warning("!" * 78)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    import uvicorn

    from autoglm_train.model.pin import PluginMismatchError
    from autoglm_train.serve.app import create_app

    try:
        app = create_app(config)
    except PluginMismatchError as err:  # a plugin trained for another decoder: one line, no traceback
        sys.exit(f"error: {err}")
    log_startup(config, app)
    server = ready_server_class()(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level))
    server.ready_line = (
        f"ready: http://{_url_host(config.host)}:{config.port}/v1 (model '{app.state.server.model_name}')"
    )
    server.run()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def ready_server_class():
    import uvicorn

    class _ReadyServer(uvicorn.Server):
        """Logs the ready line only once the listening sockets are up."""

        ready_line = "ready"

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                log.info(self.ready_line)

    return _ReadyServer
