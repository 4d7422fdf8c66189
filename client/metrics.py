"""Metrics of the NBD frontend, read at scrape time from the objects that hold the state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from netswap.client import reserve

if TYPE_CHECKING:
    from netswap.client.nbd.serve import NbdServer


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
        rpcs = CounterMetricFamily("netswap_client_rpcs", "Batched RPCs sent, by kind.", labels=["kind"])
        for kind, n in device.rpcs.items():
            rpcs.add_metric([kind], n)
        yield rpcs
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


def nbd_registry(server: NbdServer) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(NbdCollector(server))
    return registry
