"""`netswap nbd`: attach an area and export it over NBD until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import start_http_server

from netswap.client.core import PageArea
from netswap.client.errors import ConnectionLost
from netswap.client.fleet import Fleet
from netswap.client.metrics import NbdCollector, frontend_registry
from netswap.client.mirror import MirrorOptions
from netswap.client.nbd import protocol as p
from netswap.client.nbd.connection import NbdConnection
from netswap.client.nbd.device import AreaDevice
from netswap.client.nbd.retry import Backoff
from netswap.client.reserve import make_reserve_safe
from netswap.common.sizes import format_size

log = logging.getLogger("netswap.nbd")

MAX_PAYLOAD_CAP = 32 << 20
# Largest batch the frontend's channel is sized for; a server offering more
# is used at this size (SwapClient caps Area.max_batch_pages to it).
NBD_MAX_BATCH = 1024


@dataclass(frozen=True)
class NbdOptions:
    name: str
    size: int
    socket: Path | None = None
    listen: str | None = None  # HOST:PORT
    pool_pages: int = 2048  # 8 MiB of page buffers, allocated at swapon; >= 32
    retry_deadline: float = 60.0
    rpc_timeout: float = 10.0
    # Two: one batch at the server while the next collects requests. More
    # only cut batches smaller (the server answers a stream in order anyway).
    max_rpcs: int = 2
    # A run's first window (see readahead.py); two windows of up to 4x, 2 MiB, allocated at start.
    readahead_pages: int = 64
    replicas: int = 1  # copies of the area, on as many servers (2: a mirror)
    failover_timeout: float = 1.0  # mirrored: seconds a replica may take before it is marked down
    replace_after: float = MirrorOptions.replace_after  # mirrored: seconds down before a stand-in
    resync_rate: float = MirrorOptions.resync_rate  # mirrored: bytes per second copied to a copy behind
    max_connections: int = 4  # clients served at once; as many more may be in their handshake
    handshake_timeout: float = 10.0  # seconds a client has to finish its handshake
    # --listen on an address other hosts can reach: whoever reaches it reads
    # and writes the guest's swapped-out memory, with no authentication at all.
    allow_remote: bool = False
    mlock: bool = True
    realtime: bool = True  # SCHED_FIFO (client/reserve.py)
    metrics_listen: str = ""  # HOST:PORT for Prometheus, "" for none

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_rpcs < 1:
            raise ValueError("--max-connections and --max-rpcs must be at least 1")
        if self.pool_pages < 4 * self.max_connections:
            # each connection's share of the pool holds its largest request plus three scratch pages
            raise ValueError(
                f"--pool-pages ({self.pool_pages}) must be at least 4 per connection"
                f" (--max-connections {self.max_connections})"
            )
        if self.listen is not None and not self.allow_remote and not _loopback(self.listen):
            raise ValueError(
                f"refusing to export over NBD on {self.listen}: anyone who can reach it reads and writes"
                " this area's pages (NBD has no authentication). Use --socket or a loopback address,"
                " or pass --allow-remote if the network itself is trusted"
            )


async def attach(fleet: Fleet, opts: NbdOptions) -> PageArea:
    """SwapOn, waiting for the servers for up to retry_deadline (they may start after us)."""
    backoff = Backoff(asyncio.get_running_loop().time() + opts.retry_deadline)
    mirror = MirrorOptions(
        failover_timeout=opts.failover_timeout, replace_after=opts.replace_after, resync_rate=opts.resync_rate
    )
    while True:
        try:
            return await fleet.swapon(
                opts.name, opts.size, replicas=opts.replicas, pool_pages=opts.pool_pages, options=mirror
            )
        except ConnectionLost as e:
            if backoff.expired():
                raise
            log.warning("server not reachable yet (%s); retrying", e)
            await backoff.wait()


class NbdServer:
    """The listening side: one AreaDevice shared by every connection."""

    def __init__(self, area: PageArea, opts: NbdOptions) -> None:
        self.area = area
        self.opts = opts
        self.registry, self.metrics = frontend_registry()
        self.device = AreaDevice(
            area,
            retry_deadline=opts.retry_deadline,
            max_rpcs=opts.max_rpcs,
            on_batch=self.metrics.batch_pages,
            readahead_pages=opts.readahead_pages,
        )
        self.registry.register(NbdCollector(self))
        ps = area.page_size
        # Each connection may hold an equal share of the pool, so a client
        # that stops reading its replies stalls only itself; its largest
        # request (span + a page for misalignment + two RMW scratch pages)
        # fits in that share. (The kernel and QEMU use one connection each.)
        self.budget_pages = area.pool.capacity // opts.max_connections
        max_payload = min(MAX_PAYLOAD_CAP, (self.budget_pages - 3) * ps)
        self.export = p.Export(
            name=area.name,
            description=f"netswap area {area.name} ({format_size(area.size_bytes)})",
            size=area.size_bytes,
            # Every connection shares one device and one page-lock table, and
            # writes are answered only after the server has them: what one
            # connection wrote, another reads. So CAN_MULTI_CONN is true.
            flags=p.TFLAG_HAS_FLAGS
            | p.TFLAG_SEND_FLUSH
            | p.TFLAG_SEND_TRIM
            | p.TFLAG_SEND_WRITE_ZEROES
            | p.TFLAG_CAN_MULTI_CONN,
            min_block=1,
            preferred_block=ps,
            max_payload=max_payload - max_payload % ps,
        )
        self.connections: set[NbdConnection] = set()
        self._server: asyncio.base_events.Server | None = None

    def _connection(self) -> asyncio.BaseProtocol:
        # As many clients may be in their handshake as may be served; past
        # that the one waiting longest makes room, so sockets opened and left
        # idle can never keep out a client that goes on to use its connection.
        waiting = [c for c in self.connections if c.in_handshake]
        if len(waiting) >= self.opts.max_connections:
            min(waiting, key=lambda c: c.opened).drop("still in its handshake as another client connects")
        conn = NbdConnection(
            self.device,
            self.export,
            self.connections.discard,
            self.budget_pages,
            self.metrics,
            handshake_timeout=self.opts.handshake_timeout,
            on_transmission=self._room,
        )
        self.connections.add(conn)
        return conn

    def _room(self, conn: NbdConnection) -> bool:
        """Whether `conn` may start transmission: fewer than max_connections others are serving."""
        serving = sum(1 for c in self.connections if c is not conn and c.serving)
        if serving >= self.opts.max_connections:
            log.warning("refusing NBD client %s: %d clients already connected", conn.peer, serving)
            return False
        return True

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        if self.opts.socket is not None:
            path = self.opts.socket
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale socket from a previous run
            old = os.umask(0o077)  # only our user (root, for nbd-client) may connect
            try:
                self._server = await loop.create_unix_server(self._connection, str(path))
            finally:
                os.umask(old)
            return f"unix:{path}"
        assert self.opts.listen is not None
        host, _, port = self.opts.listen.rpartition(":")
        self._server = await loop.create_server(self._connection, host.strip("[]") or "127.0.0.1", int(port))
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
            await self._server.wait_closed()


def _loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_nbd(fleet: Fleet, opts: NbdOptions) -> int:
    area = await attach(fleet, opts)
    server = NbdServer(area, opts)
    where = await server.start()
    state = "created" if area.created else "re-attached"
    log.info(
        "exporting area %s (%s, %s) over NBD at %s; max request %s, pool %s",
        area.name, format_size(area.size_bytes), state, where,
        format_size(server.export.max_payload), format_size(area.pool.nbytes),
    )  # fmt: skip
    if opts.metrics_listen:
        host, _, port = opts.metrics_listen.rpartition(":")
        host = host.strip("[]")
        http, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=server.registry)
        log.info("metrics at http://%s:%d/metrics", host or "127.0.0.1", http.server_port)
    # Last: everything the data path needs now exists and has been touched.
    report = make_reserve_safe(mlock=opts.mlock, realtime=opts.realtime)
    log.info("reserve safety: %s", report.summary())
    print(f"netswap nbd: serving {area.name} at {where}; {report.summary()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: closing NBD connections; the area stays on the server")
    await server.stop()
    area.detach()
    return 0
