"""The NBD frontend rides out an unreachable or restarting server; it never serves lost data as zeros."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers import ServerProcess
from tests.nbdenv import nbd_export, run


async def test_fio_verify_survives_kill_9_and_restart_of_the_server(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, tmp_path / "store")
    await server.astart()
    try:
        async with nbd_export(server.address, tmp_path / "nbd.sock", size=64 << 20, rpc_timeout=2) as export:
            argv = ["fio", "--name=restart", "--ioengine=nbd", f"--uri={export.uri}", "--rw=randwrite"]
            # Six passes over the export: enough work that the kill lands
            # in the write phase however fast the frontend is.
            argv += ["--bs=4k", "--iodepth=32", "--size=64M", "--io_size=384M"]
            argv += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]
            fio = asyncio.ensure_future(run(*argv, cwd=tmp_path))
            device = export.server.device
            for _ in range(300):  # until writes are flowing
                if device.rpcs["out"] >= 200 or fio.done():
                    break
                await asyncio.sleep(0.1)
            assert not fio.done()
            server.kill9()
            await asyncio.sleep(1.0)  # fio's requests wait meanwhile
            await server.astart()
            out = await asyncio.wait_for(fio, 300)
        assert "err= 0" in out, out
        assert device.retries > 0  # it did wait for the server
        assert device.reattaches == 1  # and took its area back with a fresh handle
        assert device.failed is None
    finally:
        server.stop_quietly()


async def test_unreachable_past_the_deadline_is_eio_then_recovers(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, tmp_path / "store")
    await server.astart()
    try:
        async with nbd_export(
            server.address, tmp_path / "nbd.sock", size=16 << 20, rpc_timeout=1, retry_deadline=2
        ) as export:
            await run("qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x5a 0 8192")
            server.kill9()
            with pytest.raises(AssertionError, match="Input/output error"):
                await run("qemu-io", "-f", "raw", export.uri, "-c", "read -P 0x5a 0 8192", timeout=60)
            await server.astart()
            out = await run("qemu-io", "-f", "raw", export.uri, "-c", "read -P 0x5a 0 8192")
            assert "Pattern verification failed" not in out
    finally:
        server.stop_quietly()


async def test_a_lost_area_fails_every_request_instead_of_reading_zeros(tmp_path: Path) -> None:
    # A memory store forgets everything on restart: the re-attach finds no area.
    server = ServerProcess(tmp_path, tmp_path / "store", "--store", "memory")
    await server.astart()
    try:
        async with nbd_export(server.address, tmp_path / "nbd.sock", size=16 << 20, rpc_timeout=2) as export:
            await run("qemu-io", "-f", "raw", export.uri, "-c", "write -P 0x77 0 4096")
            server.kill9()
            await server.astart()
            for command in ("read 0 4096", "write -P 1 4096 4096"):
                with pytest.raises(AssertionError, match="Input/output error"):
                    await run("qemu-io", "-f", "raw", export.uri, "-c", command)
            assert export.server.device.failed is not None
            assert "was gone when re-attaching" in export.server.device.failed
    finally:
        server.stop_quietly()
