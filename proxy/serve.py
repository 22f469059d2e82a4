"""``pullgate serve``: run the mirror (and, when enabled, the admission webhook) until
SIGTERM/SIGINT, then drain: stop accepting, let in-flight pulls finish within
``shutdown_grace``, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog
from aiohttp import web

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.log import configure_logging
from proxy.server import create_app

EXAMPLE = """\
examples:
  pullgate serve                                  # embedded defaults: 127.0.0.1:5000, ./pullgate-cache, docker.io
  pullgate serve --config /etc/pullgate/config.yaml
  PULLGATE_CACHE__TAG_TTL=10m pullgate serve     # environment overrides (PULLGATE_<SECTION>__<KEY>)
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the registry mirror (and the admission webhook if enabled)",
        description=(
            "Serve the OCI distribution pull API as a caching mirror of the configured upstreams. "
            "Without --config, embedded defaults are used (listen 127.0.0.1:5000, cache in "
            "./pullgate-cache, upstream docker.io = https://registry-1.docker.io)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("PULLGATE_CONFIG"),
        help="YAML config file (default: $PULLGATE_CONFIG, else embedded defaults)",
    )
    parser.add_argument("--listen", help="override the mirror listen address HOST:PORT")
    parser.add_argument("--cache-dir", type=Path, help="override cache.dir")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = dict(os.environ)
    if args.listen:
        overrides["PULLGATE_LISTEN"] = args.listen
    if args.cache_dir:
        overrides["PULLGATE_CACHE__DIR"] = str(args.cache_dir)
    try:
        config = load_config(Path(args.config) if args.config else None, overrides)
    except ConfigError as exc:
        print(f"pullgate: config error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(config.log)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        structlog.get_logger("pullgate").error("listen_failed", error=str(exc))
        return 1
    return 0


async def serve(config: Config) -> None:
    log = structlog.get_logger("pullgate")
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_grace)
    await runner.setup()
    host, port = config.listen
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    log.info("mirror_listening", address=f"{host}:{port}", upstreams=[u.name for u in config.upstreams])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown_started", grace_seconds=config.shutdown_grace)
    await runner.cleanup()
    log.info("shutdown_complete")
