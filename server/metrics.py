"""Server metrics, all on an injected registry (tests pass a fresh CollectorRegistry).

Counters and histograms are updated on the hot path (those of every request
lock-free, see netswap.common.loopmetrics); values that already exist
as state (areas, reserved bytes, stored pages) are read at scrape time by a
collector instead of being mirrored into gauges on every write.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from netswap.common import logsink, loopmetrics
from netswap.common.limits import PAGE_SIZE

if TYPE_CHECKING:
    from netswap.server.areas import AreaManager
    from netswap.server.auth import Credentials
    from netswap.server.fairshare import FairShare
    from netswap.server.monitor import LoopMonitor

# Loopback RPCs take tens of microseconds; a slow disk, tens of milliseconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The data-plane methods as metrics name them -> as the API does.
TITLES = {"swap_out": "SwapOut", "swap_in": "SwapIn", "discard": "Discard"}


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Updated on every data-plane request: lock-free (netswap.common.loopmetrics).
        self.rpc_duration = loopmetrics.Histogram(
            "netswap_rpc_duration_seconds",
            "Time to handle a SwapService RPC, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        batch_pages = loopmetrics.Histogram(
            "netswap_batch_pages",
            "Pages carried by one SwapOut, SwapIn or Discard.",
            ["method"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        # One update per request: the pages and bytes counters are this
        # histogram's sums, read at scrape time (_MovedCollector).
        self.batch_pages = {method: batch_pages.labels(method) for method in TITLES}
        registry.register(_MovedCollector(self.batch_pages))
        self.auth_failures = Counter(
            "netswap_auth_failures_total",
            "Calls refused before reaching a handler, by reason.",
            ["reason"],
            registry=registry,
        )
        self.auth_failures_folded = Counter(
            "netswap_auth_failures_folded_total",
            "Authentication failures past their peer's budget: in a summary line, not one line each.",
            registry=registry,
        )
        self.loop_lag = loopmetrics.Histogram(
            "netswap_event_loop_lag_seconds",
            "How late a timer due every 10 ms ran: time the event loop (or the GIL) was held.",
            [],
            buckets=LAG_BUCKETS,
            registry=registry,
        )

    def watch(
        self, manager: AreaManager, credentials: Credentials, fair: FairShare, monitor: LoopMonitor
    ) -> None:
        self.registry.register(_AreaCollector(manager, credentials, fair, monitor))


class _AreaCollector(Collector):
    def __init__(
        self, manager: AreaManager, credentials: Credentials, fair: FairShare, monitor: LoopMonitor
    ) -> None:
        self._manager = manager
        self._credentials = credentials
        self._fair = fair
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self._manager
        orphans = m.orphans(self._credentials.table.has)
        yield GaugeMetricFamily(
            "netswap_orphaned_areas", "Areas whose owner is not in the tokens file.", len(orphans)
        )
        yield GaugeMetricFamily(
            "netswap_orphaned_bytes",
            "Bytes reserved by areas whose owner is not in the tokens file.",
            sum(a.size_bytes for a in orphans),
        )
        yield CounterMetricFamily(
            "netswap_fair_share_deferred",
            "Page requests that waited for their principal's turn on the event loop.",
            self._fair.deferred,
        )
        yield GaugeMetricFamily(
            "netswap_event_loop_lag_max_seconds",
            "The longest the event loop was seen held since the server started.",
            self._monitor.max_lag,
        )
        yield CounterMetricFamily(
            "netswap_log_lines_dropped",
            "Log lines dropped because the reader of the server's log was too slow.",
            logsink.dropped(),
        )
        yield GaugeMetricFamily("netswap_areas", "Areas that exist (attached or not).", m.area_count())
        yield GaugeMetricFamily("netswap_reserved_bytes", "Bytes reserved by all areas.", m.reserved_bytes)
        yield GaugeMetricFamily("netswap_capacity_bytes", "Bytes all areas may reserve together.", m.capacity)
        yield GaugeMetricFamily(
            "netswap_free_bytes", "Capacity not yet reserved.", m.capacity - m.reserved_bytes
        )
        yield GaugeMetricFamily("netswap_stored_pages", "Pages holding data in all areas.", m.stored_pages())


class _MovedCollector(Collector):
    """netswap_{method}_pages_total and _bytes_total: the sums of the batch size histogram."""

    def __init__(self, batches: dict[str, loopmetrics.Series]) -> None:
        self._batches = batches

    def collect(self) -> Iterator[CounterMetricFamily]:
        for method, title in TITLES.items():
            pages = self._batches[method].counts[-1]
            yield CounterMetricFamily(f"netswap_{method}_pages", f"Pages moved by successful {title}.", pages)
            if method != "discard":
                yield CounterMetricFamily(
                    f"netswap_{method}_bytes", f"Page bytes moved by successful {title}.", pages * PAGE_SIZE
                )
