"""build_server(): the one factory that assembles the service. Tests call it with port 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from netswap.common import heap
from netswap.common.limits import max_message_bytes
from netswap.server.areas import AreaManager
from netswap.server.audit import AuditLog
from netswap.server.auth import Credentials, TokenTable
from netswap.server.config import Config
from netswap.server.fairshare import FairShare
from netswap.server.gate import AuthPolicy, CallLimits, Gate
from netswap.server.handlers import SwapService
from netswap.server.metrics import ServerMetrics
from netswap.server.monitor import LoopMonitor
from netswap.server.requests import PagePath
from netswap.server.store import Store
from netswap.v1 import swap_pb2

log = logging.getLogger(__name__)

# grpc-stubs does not know the asyncio health servicer.
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

SERVICE_NAME = swap_pb2.DESCRIPTOR.services_by_name["SwapService"].full_name
CHORES_EVERY = 2.0  # seconds: audit summaries, giving a burst's memory back
TRIM_ABOVE = 4 << 20  # free heap bytes kept for reuse before the rest goes back to the kernel


class NetswapServer:
    """A built, bound, not yet started server."""

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        manager: AreaManager,
        health: Any,
        address: str,
        credentials: Credentials,
        gate: Gate,
        monitor: LoopMonitor,
    ) -> None:
        self.grpc = server
        self.manager = manager
        self.credentials = credentials  # reload() on SIGHUP
        self.gate = gate
        self.monitor = monitor
        self.address = address  # what clients dial: "127.0.0.1:PORT" or "unix:PATH"
        self._health = health
        self.health_server: grpc.aio.Server | None = None  # the probes' plaintext port, if any
        self.health_address: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.report_orphans()
        await self.grpc.start()
        if self.health_server is not None:
            await self.health_server.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._tasks = [asyncio.ensure_future(self.monitor.run()), asyncio.ensure_future(self._chores())]

    async def reload(self) -> None:
        """Re-read the tokens file (in a worker thread); on any problem keep the table in force
        and raise TokensError."""
        if self.credentials.path is not None:
            self.credentials.table = await asyncio.to_thread(TokenTable.load, self.credentials.path)
        self.report_orphans()

    def report_orphans(self) -> None:
        """Log the areas whose owner the tokens file no longer names (they are never deleted)."""
        for area in self.manager.orphans(self.credentials.table.has):
            log.warning(
                "area %r of principal %r (%d bytes, %d pages stored) has an owner the tokens file does"
                " not name: nobody can attach it, and a principal added under that name would get it;"
                " `netswap-server areas` lists and destroys such areas",
                area.name, area.owner, area.size_bytes, area.pages_stored,
            )  # fmt: skip

    async def _chores(self) -> None:
        while True:
            await asyncio.sleep(CHORES_EVERY)
            self.gate.flush()
            await asyncio.to_thread(heap.trim, TRIM_ABOVE)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting calls, let in-flight ones finish for `grace` seconds, close the store."""
        await self._health.enter_graceful_shutdown()
        if self.health_server is not None:
            await self.health_server.stop(None)
        await self.grpc.stop(grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.gate.flush()
        await self.manager.close()


def build_server(config: Config, store: Store, registry: CollectorRegistry) -> NetswapServer:
    credentials = Credentials(config.tokens)
    audit = AuditLog()
    metrics = ServerMetrics(registry)
    manager = AreaManager(
        store,
        capacity=config.capacity,
        max_area_size=config.max_area_size,
        max_batch_pages=config.max_batch_pages,
        quota_of=credentials.quota_of,
        max_areas_per_principal=config.max_areas_per_principal,
        swapon_rate=config.swapon_rate,
        swapon_burst=config.swapon_burst,
        io_threads=config.io_threads,
        audit=audit,
    )
    fair = FairShare()
    monitor = LoopMonitor(metrics.loop_lag)
    metrics.watch(manager, credentials, fair, monitor)
    gate = Gate(
        credentials,
        AuthPolicy(mutual_tls=config.tls_client_ca is not None, require_token=config.require_token),
        CallLimits(
            max_calls=config.max_calls_per_principal,
            max_streams=config.max_streams_per_principal,
            failure_burst=config.auth_failure_burst,
            failure_rate=config.auth_failure_rate,
        ),
        metrics,
        audit,
    )
    service = SwapService(
        manager, gate, PagePath(manager, metrics, fair), audit, request_timeout=config.request_timeout
    )
    # Twice the largest valid message may arrive, so a batch that is merely
    # too big reaches the manager and gets INVALID_ARGUMENT naming the
    # problem; beyond that gRPC cuts it off (RESOURCE_EXHAUSTED) before
    # buffering more.
    limit = max_message_bytes(config.max_batch_pages)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 2 * limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_concurrent_streams", config.max_streams),
            ("grpc.max_allowed_incoming_connections", config.max_connections),
            ("grpc.server_handshake_timeout_ms", int(config.request_timeout * 1000)),
            *(
                [("grpc.max_connection_idle_ms", int(config.idle_timeout * 1000))]
                if config.idle_timeout
                else []
            ),
        ],
    )
    # SwapService alone: every call on this port is authenticated before its
    # body is read, and health or reflection requests would be parsed for
    # anyone, up to the message limit SwapOut needs. They get a port of their own.
    service.register(server)
    health_servicer = HealthServicer()
    if config.tls_cert is not None and config.tls_key is not None:
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        tls = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(config.listen, tls)
    else:
        port = server.add_insecure_port(config.listen)
    if config.listen.startswith("unix:"):
        address = config.listen
    else:
        host = config.listen.rpartition(":")[0] or "127.0.0.1"
        address = f"{host}:{port}"
    built = NetswapServer(
        server,
        manager=manager,
        health=health_servicer,
        address=address,
        credentials=credentials,
        gate=gate,
        monitor=monitor,
    )
    if config.health_listen:
        # Probes (kubelet's gRPC probes, Docker's HEALTHCHECK) speak plaintext
        # and carry no token: they get a port of their own that serves health
        # and reflection, with messages capped at what those need.
        built.health_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, built.health_server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            built.health_server,
        )
        health_port = built.health_server.add_insecure_port(config.health_listen)
        built.health_address = f"{config.health_listen.rpartition(':')[0]}:{health_port}"
    return built
