"""A QEMU guest swapping onto a mirrored area survives losing a server, machine and disk, mid-run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from netswap.client.mirror import MirroredArea
from tests.guest import walltimes
from tests.guest.test_host_frontend import SECTION, assets, explain
from tests.guestvm import run_guest
from tests.nbd.test_mirror import holding, lose_machine, three_servers
from tests.nbdenv import nbd_export


async def test_guest_survives_losing_a_server_of_its_mirror(tmp_path: Path) -> None:
    guest = assets()
    async with three_servers(tmp_path, "--capacity", "1GiB") as servers:
        address = ",".join(s.address for s in servers)
        async with nbd_export(address, tmp_path / "nbd.sock", size=512 << 20, replicas=2) as export:
            mirror = export.server.area
            assert isinstance(mirror, MirroredArea)
            run = asyncio.ensure_future(asyncio.to_thread(run_guest, guest, export.uri))
            device = export.server.device
            deadline = time.monotonic() + 300
            while device.rpcs["out"] < 200:  # swapping hard: now the machine goes
                assert not run.done() and time.monotonic() < deadline, "the guest never started swapping"
                await asyncio.sleep(0.2)
            victim = holding(servers, mirror, 0)
            lose_machine(victim)
            result = await run
            assert result.ok, explain(result, *(s.log for s in servers))
            assert mirror.failovers >= 1
            assert device.failed is None and device.retries == 0  # the guest's kernel never waited on a retry
    walltimes.record(SECTION, "netswap mirrored on 3 servers, one lost", result)
