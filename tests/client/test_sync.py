"""The blocking facade drives the same async core from plain threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from netswap.client import InvalidRequest
from netswap.client.sync import SwapClient
from tests.helpers import PS, TOKENS, pattern, server_process


def test_sync_client_round_trip_from_threads(tmp_path: Path) -> None:
    with (
        server_process(tmp_path, tmp_path / "store") as server,
        SwapClient(server.address, TOKENS["alice"]) as client,
    ):
        area = client.swapon("vm1", 1 << 20, pool_pages=4)
        assert area.created and area.slot_count == 256
        data = pattern(3, 256)
        area.swap_out(range(256), data)
        errors: list[BaseException] = []

        def reader(first: int) -> None:
            try:
                for i in range(first, 256, 8):
                    with area.swap_in([i, (i + 1) % 256]) as pages:
                        assert pages.view == data[i * PS : (i + 1) * PS] + data[(i + 1) % 256 * PS :][:PS]
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with pytest.raises(InvalidRequest):
            area.swap_out([256], bytes(PS))
        area.discard([0])
        buf = bytearray(PS)
        area.swap_in([0], into=buf).release()
        assert buf == bytes(PS)
        assert [(a.name, a.pages_stored) for a in client.list_areas()] == [("vm1", 255)]
        area.swapoff()
        assert client.list_areas() == []
