"""Metrics reflect what happened, on an injected registry and over HTTP."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from netswap.client import InvalidRequest, SwapClient
from netswap.common import loopmetrics
from tests.helpers import PS, TOKENS, Running, pattern, running_server, server_process


async def test_counters_histograms_and_scrape_time_gauges(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 1 << 20)
        await area.swap_out(range(10), pattern(1, 10))
        (await area.swap_in(range(4))).release()
        await area.discard([0, 1])
        with pytest.raises(InvalidRequest):
            await area.swap_out([999], bytes(PS))
    assert srv.metric("netswap_swap_out_pages_total") == 10
    assert srv.metric("netswap_swap_out_bytes_total") == 10 * PS
    assert srv.metric("netswap_swap_in_pages_total") == 4
    assert srv.metric("netswap_swap_in_bytes_total") == 4 * PS
    assert srv.metric("netswap_discard_pages_total") == 2
    assert srv.metric("netswap_batch_pages_sum", {"method": "swap_out"}) == 10
    assert srv.metric("netswap_rpc_duration_seconds_count", {"method": "SwapOut", "code": "OK"}) == 1
    assert (
        srv.metric("netswap_rpc_duration_seconds_count", {"method": "SwapOut", "code": "INVALID_ARGUMENT"})
        == 1
    )
    assert srv.metric("netswap_rpc_duration_seconds_count", {"method": "SwapOn", "code": "OK"}) == 1
    assert srv.metric("netswap_areas") == 1
    assert srv.metric("netswap_reserved_bytes") == 1 << 20
    assert srv.metric("netswap_capacity_bytes") == srv.config.capacity
    assert srv.metric("netswap_free_bytes") == srv.config.capacity - (1 << 20)
    assert srv.metric("netswap_stored_pages") == 8


async def test_two_servers_in_one_process_do_not_collide(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_server(tmp_path / "a") as one, running_server(tmp_path / "b") as two:
        assert one.registry is not two.registry


def test_server_process_serves_metrics_over_http(tmp_path: Path) -> None:
    with server_process(tmp_path, tmp_path / "store", "--metrics-listen", "127.0.0.1:0") as server:
        url = re.search(r"metrics=(http://\S+)", server.log.read_text())
        assert url, server.log.read_text()
        with urllib.request.urlopen(url.group(1), timeout=10) as r:
            text = r.read().decode()
        assert server.terminate() == 0
    assert "netswap_reserved_bytes 0.0" in text
    assert "# TYPE netswap_rpc_duration_seconds histogram" in text
    assert "process_resident_memory_bytes" in text


def test_lock_free_histogram_exposes_what_prometheus_client_would() -> None:
    """netswap.common.loopmetrics stands in for prometheus_client's Histogram on the data
    path: a scrape must not tell them apart (bucket bounds, values on a bound, cumulative
    counts, sums)."""
    bounds = (0.00005, 0.001, 1.0, 4096)
    values = [0.0, 0.00005, 0.00007, 0.001, 0.5, 1.0, 2.0, 4096, 5000.0]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = loopmetrics.Histogram("h_seconds", "doc", ["a", "b"], bounds, ours)
    ref = Histogram("h_seconds", "doc", ["a", "b"], buckets=bounds, registry=theirs)
    for i, v in enumerate(values):
        mine.labels("x", str(i % 2)).observe(v)
        ref.labels("x", str(i % 2)).observe(v)

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")  # when a series began: prometheus_client's extra
        }

    assert samples(ours) == samples(theirs)
    assert len(samples(ours)) == 2 * (len(bounds) + 3)
    with pytest.raises(ValueError, match="takes labels"):
        mine.labels("only one")
    assert mine.labels("x", 1) is mine.labels("x", "1")  # label values are strings, as there
    with pytest.raises(ValueError, match="increasing"):
        loopmetrics.Histogram("bad", "doc", [], (1.0, 0.5), CollectorRegistry())
