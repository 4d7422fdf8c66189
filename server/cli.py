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

from netswap.common import logsink, loop
from netswap.common.heap import keep_heap
from netswap.common.limits import NAME_PATTERN
from netswap.common.sizes import format_size, size_arg
from netswap.server import admin
from netswap.server.app import build_server
from netswap.server.auth import TokensError, TokenTable, new_token
from netswap.server.config import Config, config_from_args
from netswap.server.errors import ServiceError
from netswap.server.store import open_store
from netswap.server.store.file import StoreBusy, hold

log = logging.getLogger("netswap.server")


async def serve(config: Config) -> None:
    # One process at a time changes a file store (see `netswap-server areas`).
    lock = hold(config.store_path) if config.store_path is not None else None
    try:
        await _serve(config)
    finally:
        if lock is not None:
            os.close(lock)


async def _serve(config: Config) -> None:
    store = open_store(config.store, mlock=config.mlock)
    server = build_server(config, store, REGISTRY)
    metrics_http = None
    metrics_at = "off"
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        metrics_http, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
        metrics_at = f"http://{host or '127.0.0.1'}:{metrics_http.server_port}/metrics"
    running = asyncio.get_running_loop()

    async def reload_tokens() -> None:
        try:
            await server.reload()
        except TokensError as e:
            log.error("SIGHUP: tokens file NOT reloaded, the previous one stays in force: %s", e)
        else:
            log.info("SIGHUP: reloaded tokens file %s", config.tokens)

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.ensure_future(reload_tokens())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    running.add_signal_handler(signal.SIGHUP, on_hup)

    await server.start()
    m = server.manager
    security = (
        "mutual TLS" + (" + token" if config.require_token else "")
        if config.tls_client_ca
        else "TLS + token"
        if config.tls
        else "PLAINTEXT + token"
    )
    if not config.tls and config.insecure:
        for _ in range(3):  # hard to miss in a log
            log.warning(
                "INSECURE: plaintext on %s; tokens and pages cross the network in clear", config.listen
            )
    log.info(
        "serving on %s (%s): store=%s capacity=%s reserved=%s areas=%d max_batch_pages=%d metrics=%s health=%s",
        server.address, security, config.store, format_size(m.capacity), format_size(m.reserved_bytes),
        m.area_count(), m.max_batch_pages, metrics_at, server.health_address or "off",
    )  # fmt: skip
    stop = asyncio.Event()
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
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(entry)
    if args.token_out:
        fd = os.open(args.token_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # the mode above only applies to a new file
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"principal {args.name}: token written to {args.token_out}")
    else:
        print(token)
    return 0


def healthcheck(argv: Sequence[str]) -> int:
    """Exit 0 if the health port answers SERVING (for Docker's HEALTHCHECK and scripts)."""
    parser = argparse.ArgumentParser(
        prog="netswap-server healthcheck",
        description="Ask the local health port (--health-listen) whether the server is SERVING.",
    )
    default = os.environ.get("NETSWAP_HEALTH_LISTEN", "")
    parser.add_argument("--address", default=default, help="HOST:PORT [default: NETSWAP_HEALTH_LISTEN]")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("no health port: set NETSWAP_HEALTH_LISTEN or pass --address")
    host, _, port = args.address.rpartition(":")
    target = f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]", "::") else args.address  # noqa: S104
    import grpc  # noqa: PLC0415 (only this subcommand needs a client)
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def gen_dev_certs(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="netswap-server gen-dev-certs",
        description="Write a development CA, a server certificate (localhost, 127.0.0.1) and one client"
        " certificate per principal (SAN URI spiffe://netswap.dev/principal/NAME) into DIR.",
    )
    parser.add_argument("dir", type=Path)
    parser.add_argument("--principal", action="append", default=[], help="repeat for each client certificate")
    args = parser.parse_args(argv)
    for name in args.principal:
        if not NAME_PATTERN.fullmatch(name):
            parser.error(f"principal name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    try:
        from netswap.server.devcerts import write_dev_certs  # noqa: PLC0415 (optional dependency)
    except ImportError:
        parser.error("needs the 'cryptography' package: pip install 'netswap[certs]'")
    for path in write_dev_certs(args.dir, args.principal):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["gen-token"]:
        return gen_token(args[1:])
    if args[:1] == ["gen-dev-certs"]:
        return gen_dev_certs(args[1:])
    if args[:1] == ["healthcheck"]:
        return healthcheck(args[1:])
    if args[:1] == ["areas"]:
        return admin.main(args[1:])
    config = config_from_args(args, os.environ)
    keep_heap(one_arena=True)  # page batches in and out all day: see netswap.common.heap
    logsink.install(config.log_level.upper())  # a stalled reader of stderr must not stall tenants
    # The audit trail is not chatter: --log-level quiets the rest, never it.
    logging.getLogger("netswap.audit").setLevel(logging.INFO)
    try:
        loop.run(lambda: serve(config))
    except (TokensError, ServiceError, StoreBusy, OSError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    return 0
