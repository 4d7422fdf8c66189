"""Metrics of the NBD frontend, read at scrape time from the objects that hold the state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from netswap.client import reserve
from netswap.client.mirror import MirroredArea, State
from netswap.common import logsink, loopmetrics

if TYPE_CHECKING:
    from netswap.client.nbd.serve import NbdServer


LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COMMANDS = {0: "read", 1: "write", 2: "disc", 3: "flush", 4: "trim", 6: "write_zeroes"}
REQUESTS = "netswap_client_nbd_request_duration_seconds"


class FrontendMetrics:
    """What the frontend updates as it works; the rest is read at scrape time (NbdCollector).

    Both histograms see every request or RPC, so they are lock-free
    (netswap.common.loopmetrics).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = loopmetrics.Histogram(
            REQUESTS,
            "NBD requests by command and outcome: time from the request being in hand to its reply.",
            ["command", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._by_request: dict[tuple[int, bool], loopmetrics.Series] = {}
        self.batch_pages = loopmetrics.Histogram(
            "netswap_client_batch_pages",
            "Pages per RPC after coalescing NBD requests, by kind (in, out, discard).",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

    def request_done(self, cmd: int, seconds: float, ok: bool) -> None:
        series = self._by_request.get((cmd, ok))
        if series is None:
            labels = (COMMANDS.get(cmd, "other"), "ok" if ok else "error")
            series = self._by_request[cmd, ok] = self.requests.labels(*labels)
        series.observe(seconds)


class NbdCollector(Collector):
    def __init__(self, server: NbdServer) -> None:
        self._server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._server
        pool = s.area.pool
        device = s.device
        yield GaugeMetricFamily(
            "netswap_client_memory_locked_bytes", "Bytes of this process locked in RAM (VmLck).",
            reserve.status_bytes("VmLck"),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "netswap_client_io_flusher", "1 if the kernel treats this process as an I/O flusher.",
            int(reserve.io_flusher_set()),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "netswap_client_pool_pages", "Pages in the page pool (fixed at swapon).", pool.capacity
        )
        yield GaugeMetricFamily(
            "netswap_client_pool_free_pages", "Pool pages not leased right now.", pool.free_pages
        )
        yield GaugeMetricFamily("netswap_client_nbd_connections", "Open NBD connections.", len(s.connections))
        yield GaugeMetricFamily(
            "netswap_client_nbd_requests_in_flight",
            "NBD requests accepted on open connections and not yet answered.",
            # A copy first: this runs in the scrape thread while the loop adds and removes.
            sum(c.busy for c in list(s.connections)),
        )
        rpcs = CounterMetricFamily("netswap_client_rpcs", "Batched RPCs sent, by kind.", labels=["kind"])
        for kind, n in device.rpcs.items():
            rpcs.add_metric([kind], n)
        yield rpcs
        readahead = CounterMetricFamily(
            "netswap_client_readahead_pages",
            "Pages read ahead for sequential reads (fetched), pages of reads answered from them (hit),"
            " and pages of windows dropped because a write overlapped them (dropped).",
            labels=["outcome"],
        )
        if device.readahead is not None:
            ra = device.readahead
            for outcome, n in (("fetched", ra.fetched), ("hit", ra.hits), ("dropped", ra.dropped)):
                readahead.add_metric([outcome], n)
        yield readahead
        yield CounterMetricFamily(
            "netswap_client_retries",
            "RPC attempts retried because the server was unreachable.",
            device.retries,
        )
        yield CounterMetricFamily(
            "netswap_client_reattaches", "Fresh handles after the server forgot ours.", device.reattaches
        )
        yield GaugeMetricFamily(
            "netswap_client_device_failed",
            "1 once the area was found lost; every request fails.",
            int(device.failed is not None),
        )
        yield GaugeMetricFamily(
            "netswap_client_server_up",
            "1 if the last RPC reached the server, 0 while retrying.",
            int(device.server_up),
        )
        yield CounterMetricFamily(
            "netswap_client_log_lines_dropped",
            "Log lines dropped because the reader of the frontend's log was too slow.",
            logsink.dropped(),
        )
        yield from _replicas(s.area, device.server_up)


def _replicas(area: object, server_up: bool) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The area's copies: how many are in each state, and how far behind they are. An area on
    one server is one copy, up while its server answers."""
    mirror = area if isinstance(area, MirroredArea) else None
    replicas = GaugeMetricFamily(
        "netswap_client_replicas", "Copies of the area by state (up, syncing, down).", labels=["state"]
    )
    states = [r.state for r in list(mirror.replicas)] if mirror else [State.UP if server_up else State.DOWN]
    for state in State:
        replicas.add_metric([state.value], states.count(state))
    yield replicas
    yield GaugeMetricFamily(
        "netswap_client_area_degraded",
        "1 while a copy of a mirrored area is down or behind.",
        int(mirror.degraded) if mirror else 0,
    )
    yield CounterMetricFamily(
        "netswap_client_degraded_seconds",
        "Seconds a mirrored area has spent degraded.",
        mirror.degraded_seconds if mirror else 0.0,
    )
    yield CounterMetricFamily(
        "netswap_client_failovers",
        "Copies marked down (a failed or late request); I/O went on with the others.",
        mirror.failovers if mirror else 0,
    )
    yield GaugeMetricFamily(
        "netswap_client_resync_remaining_slots",
        "Slots still to be copied to copies that are behind.",
        mirror.resync_remaining if mirror else 0,
    )
    yield CounterMetricFamily(
        "netswap_client_resync_bytes",
        "Bytes copied to copies that were behind.",
        mirror.resync_bytes if mirror else 0,
    )


def frontend_registry() -> tuple[CollectorRegistry, FrontendMetrics]:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry, FrontendMetrics(registry)
