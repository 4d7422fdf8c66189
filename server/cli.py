"""`netswap-server`: run the service, or `netswap-server gen-token` to add a principal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import REGISTRY, start_http_server

from netswap.common import loop
from netswap.common.limits import NAME_PATTERN
from netswap.common.sizes import format_size, size_arg
from netswap.server.app import build_server
from netswap.server.auth import TokensError, TokenTable, new_token
from netswap.server.config import Config, config_from_args
from netswap.server.errors import ServiceError
from netswap.server.store import open_store

log = logging.getLogger("netswap.server")


async def serve(config: Config) -> None:
    store = open_store(config.store, mlock=config.mlock)
    server = build_server(config, store, REGISTRY)
    metrics_http = None
    metrics_at = "off"
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        metrics_http, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
        metrics_at = f"http://{host or '127.0.0.1'}:{metrics_http.server_port}/metrics"
    await server.start()
    m = server.manager
    log.info(
        "serving on %s: store=%s capacity=%s reserved=%s areas=%d max_batch_pages=%d metrics=%s",
        server.address, config.store, format_size(m.capacity), format_size(m.reserved_bytes),
        m.area_count(), m.max_batch_pages, metrics_at,
    )  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls (up to %.0fs)", config.grace_seconds)
    await server.stop(config.grace_seconds)
    if metrics_http is not None:
        metrics_http.shutdown()
        metrics_http.server_close()
    log.info("stopped")


def gen_token(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="netswap-server gen-token",
        description="Add a principal with a fresh token to a tokens file (made 0600 if new).",
    )
    parser.add_argument("name", help="principal name")
    parser.add_argument("--tokens", type=Path, required=True, help="tokens file to append to")
    parser.add_argument("--quota", type=size_arg, help="bytes the principal may reserve, e.g. 4GiB")
    parser.add_argument("--token-out", type=Path, help="write the token here (0600) instead of stdout")
    args = parser.parse_args(argv)
    if not NAME_PATTERN.fullmatch(args.name):
        parser.error(f"principal name {args.name!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if args.tokens.exists():
        try:
            known = TokenTable.load(args.tokens)
        except TokensError as e:
            parser.error(str(e))
        if known.has(args.name):
            parser.error(f"principal {args.name!r} is already in {args.tokens}")
    token, digest = new_token()
    # Quoted: a name may contain "." which would otherwise nest TOML tables.
    entry = f'\n[principals."{args.name}"]\ntoken_sha256 = "{digest}"\n'
    if args.quota is not None:
        entry += f"quota_bytes = {args.quota}\n"
    fd = os.open(args.tokens, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(entry)
    if args.token_out:
        fd = os.open(args.token_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"principal {args.name}: token written to {args.token_out}")
    else:
        print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["gen-token"]:
        return gen_token(args[1:])
    config = config_from_args(args, os.environ)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        loop.run(lambda: serve(config))
    except (TokensError, ServiceError, OSError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    return 0
