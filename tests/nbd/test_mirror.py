"""A mirrored area through NBD, on three real servers: losing one (dead, hung, or gone with its
disk) shows the client no error, and a server that comes back is brought up to date."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netswap.client.mirror import MirroredArea, State
from tests.helpers import ServerProcess
from tests.nbdenv import Export, nbd_export, run


@contextlib.asynccontextmanager
async def three_servers(tmp_path: Path, *extra: str) -> AsyncIterator[list[ServerProcess]]:
    servers = []
    for i in range(3):
        home = tmp_path / f"server{i}"
        home.mkdir()
        servers.append(ServerProcess(home, home / "store", *extra))
    try:
        for server in servers:
            await server.astart()
        yield servers
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGCONT)  # a stopped one must be able to die
            server.stop_quietly()


def mirror_of(export: Export) -> MirroredArea:
    area = export.server.area
    assert isinstance(area, MirroredArea)
    return area


def holding(servers: list[ServerProcess], area: MirroredArea, index: int) -> ServerProcess:
    """The server of the area's replica number `index`."""
    return next(s for s in servers if s.address == area.replicas[index].server)


def lose_machine(server: ServerProcess) -> None:
    """kill -9, and its disk with it."""
    server.kill9()
    shutil.rmtree(server.log.parent / "store")


async def until(condition: object, seconds: float = 60) -> None:
    for _ in range(int(seconds * 10)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out waiting")


async def test_fio_verify_survives_losing_a_replicas_machine_and_the_copy_is_rebuilt(tmp_path: Path) -> None:
    async with three_servers(tmp_path) as servers:
        address = ",".join(s.address for s in servers)
        # 65 MiB areas: the mirror is a page less (its generation page), 64 MiB for fio
        async with nbd_export(address, tmp_path / "nbd.sock", size=65 << 20, replicas=2) as export:
            mirror = mirror_of(export)
            assert [r.state for r in mirror.replicas] == [State.UP, State.UP]
            argv = ["fio", "--name=mirror", "--ioengine=nbd", f"--uri={export.uri}", "--rw=randwrite"]
            argv += ["--bs=4k", "--iodepth=32", "--size=64M", "--io_size=256M"]
            argv += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]
            fio = asyncio.ensure_future(run(*argv, cwd=tmp_path))
            device = export.server.device
            await until(lambda: device.rpcs["out"] >= 200 or fio.done())
            assert not fio.done()
            victim = holding(servers, mirror, 0)
            lose_machine(victim)
            out = await asyncio.wait_for(fio, 300)
            assert "err= 0" in out, out
            assert mirror.failovers >= 1 and mirror.degraded
            assert device.failed is None and device.retries == 0  # the kernel's side never waited
            # The machine comes back, empty: every slot is copied to it.
            await victim.astart()
            await until(lambda: not mirror.degraded)
            assert mirror.resync_bytes > 0
            before = tmp_path / "before.img"
            await run("nbdcopy", export.uri, str(before))
            # Now lose the other copy: everything reads back the same, from the rebuilt one.
            lose_machine(holding(servers, mirror, 1))
            after = tmp_path / "after.img"
            await run("nbdcopy", export.uri, str(after))
            assert before.read_bytes() == after.read_bytes()
            assert device.failed is None


async def test_a_hung_replica_is_left_behind_within_the_failover_timeout(tmp_path: Path) -> None:
    async with three_servers(tmp_path) as servers:
        address = ",".join(s.address for s in servers)
        async with nbd_export(
            address, tmp_path / "nbd.sock", size=16 << 20, replicas=2, failover_timeout=1.0
        ) as export:
            mirror = mirror_of(export)
            await run("qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x11 0 1M")
            hung = holding(servers, mirror, 0)
            assert hung.proc is not None
            os.kill(hung.proc.pid, signal.SIGSTOP)
            try:
                # Both go on without it: the write waits at most the timeout for it.
                await run(
                    "qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x22 1M 1M", "-c", "read -P 0x11 0 1M",
                    timeout=30,
                )  # fmt: skip
                assert mirror.replicas[0].state is State.DOWN
                assert export.server.device.failed is None
            finally:
                os.kill(hung.proc.pid, signal.SIGCONT)
            await until(lambda: not mirror.degraded)  # back, and the missed writes copied to it
            lose_machine(holding(servers, mirror, 1))
            out = await run(
                "qemu-io", "-f", "raw", export.uri, "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M"
            )
            assert "Pattern verification failed" not in out


async def test_losing_every_replica_is_eio_never_zeros(tmp_path: Path) -> None:
    async with three_servers(tmp_path) as servers:
        address = ",".join(s.address for s in servers)
        async with nbd_export(
            address, tmp_path / "nbd.sock", size=16 << 20, replicas=2, retry_deadline=3
        ) as export:
            mirror = mirror_of(export)
            await run("qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x33 0 64k")
            for index in (0, 1):
                lose_machine(holding(servers, mirror, index))
            with pytest.raises(AssertionError, match="Input/output error"):
                await run("qemu-io", "-f", "raw", export.uri, "-c", "read -P 0x33 0 64k", timeout=60)


async def test_a_restarted_frontend_follows_the_copy_that_has_every_write(tmp_path: Path) -> None:
    async with three_servers(tmp_path) as servers:
        address = ",".join(s.address for s in servers)
        async with nbd_export(address, tmp_path / "nbd.sock", size=16 << 20, replicas=2) as export:
            mirror = mirror_of(export)
            await run("qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x11 0 1M")
            behind = holding(servers, mirror, 0)  # the first in placement order
            behind.kill9()  # its process only: the copy, with 0x11, stays on its disk
            await run("qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x22 0 1M")
            assert mirror.replicas[0].state is State.DOWN
            assert mirror.replicas[1].generation > mirror.replicas[0].generation
        # The frontend is gone, and with it what it knew of which copy is behind.
        await behind.astart()
        async with nbd_export(address, tmp_path / "nbd.sock", size=16 << 20, replicas=2) as export:
            mirror = mirror_of(export)
            assert not mirror.created and [r.state for r in mirror.replicas] == [State.SYNCING, State.UP]
            out = await run("qemu-io", "-f", "raw", export.uri, "-c", "read -P 0x22 0 1M")
            assert "Pattern verification failed" not in out
            await until(lambda: not mirror.degraded)  # the old copy rebuilt from the new
            lose_machine(holding(servers, mirror, 1))
            out = await run("qemu-io", "-f", "raw", export.uri, "-c", "read -P 0x22 0 1M")
            assert "Pattern verification failed" not in out
