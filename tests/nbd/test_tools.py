"""The NBD frontend against NBD clients nobody here wrote: libnbd's tools, qemu-io, fio."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from netswap.client import SwapClient
from netswap.client.fleet import Fleet
from netswap.client.nbd.serve import NbdOptions, NbdServer, attach
from tests.helpers import TOKENS, ServerProcess, running_server
from tests.nbdenv import require_tools, run, server_and_export


async def test_nbdinfo_sees_size_and_block_constraints(tmp_path: Path) -> None:
    async with server_and_export(tmp_path, size=64 << 20) as (_, export):
        info = await run("nbdinfo", export.uri)
    assert "export-size: 67108864" in info
    assert "block_size_minimum: 1" in info
    assert "block_size_preferred: 4096" in info
    assert re.search(r"block_size_maximum: (\d+)", info)
    for line in (
        "can_flush: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "is_read_only: false",
    ):
        assert line in info, info
    assert "description: netswap area vm1 (64MiB)" in info


async def test_qemu_io_patterns_at_aligned_and_unaligned_offsets(tmp_path: Path) -> None:
    async with server_and_export(tmp_path) as (_, export):
        commands = [
            "write -P 0xab 4095 9000",
            "read -P 0xab 4095 9000",
            "read -P 0 0 4095",  # neighbours untouched
            "read -P 0 13095 1000",
            "write -P 0x11 0 65536",
            "write -P 0x22 100 1",  # one byte inside a page
            "read -P 0x11 0 100",
            "read -P 0x22 100 1",
            "read -P 0x11 101 65435",
            "write -z 4000 10000",  # write zeroes, both edges partial
            "read -P 0x11 0 100",
            "read -P 0x22 100 1",
            "read -P 0x11 101 3899",
            "read -P 0 4000 10000",
            "read -P 0x11 14000 51536",
            "discard 16384 16384",
            "read -P 0 16384 16384",
            "write -P 0x33 67104768 4096",  # the last page
            "read -P 0x33 67104768 4096",
        ]
        argv = ["qemu-io", "-f", "raw", export.uri]
        for c in commands:
            argv += ["-c", c]
        out = await run(*argv)
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == sum(c.startswith("read") for c in commands), out


async def test_nbdcopy_round_trip_is_byte_identical(tmp_path: Path) -> None:
    data = os.urandom(24 << 20)
    (tmp_path / "in.bin").write_bytes(data)
    async with server_and_export(tmp_path, size=24 << 20) as (srv, export):
        await run("nbdcopy", str(tmp_path / "in.bin"), export.uri)
        await run("nbdcopy", export.uri, str(tmp_path / "out.bin"))
        stored = srv.server.manager.list_areas("alice")[0].pages_stored
    assert (tmp_path / "out.bin").read_bytes() == data
    assert stored == (24 << 20) // 4096


async def test_fio_random_write_read_verify_iodepth_32(tmp_path: Path) -> None:
    async with server_and_export(tmp_path, size=64 << 20) as (srv, export):
        out = await run(
            "fio", "--name=verify", "--ioengine=nbd", f"--uri={export.uri}",
            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=48M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=normal",
            cwd=tmp_path,  # fio leaves a verify state file in its working directory
        )  # fmt: skip
        requests = srv.metric("netswap_swap_out_pages_total")
        rpcs = srv.metric("netswap_batch_pages_count", {"method": "swap_out"})
    assert "err= 0" in out, out
    assert not re.search(r"verify: bad|crc32c: wanted", out), out
    assert requests >= (48 << 20) // 4096
    # iodepth 32 of 4 KiB writes: the frontend coalesced them into fewer, larger RPCs
    assert rpcs < requests / 2, f"{rpcs} SwapOut RPCs for {requests} pages: no coalescing"


async def test_the_netswap_nbd_command(tmp_path: Path) -> None:
    """`netswap nbd` as a user runs it: serve, answer a real client, stop on SIGTERM, keep the area."""
    require_tools()
    server = ServerProcess(tmp_path, tmp_path / "store")
    await server.astart()
    sock = tmp_path / "nbd.sock"
    env = {**os.environ, "NETSWAP_TOKEN": TOKENS["alice"], "NETSWAP_SERVER": server.address}
    argv = [sys.executable, "-m", "netswap.client", "nbd", "vm9", "--size", "8MiB", "--socket", str(sock)]
    nbd = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        assert nbd.stdout is not None
        first = await asyncio.wait_for(nbd.stdout.readline(), 30)
        while b"serving vm9" not in first:
            assert first, "netswap nbd exited before serving"
            first = await asyncio.wait_for(nbd.stdout.readline(), 30)
        assert sock.stat().st_mode & 0o077 == 0  # only its owner may connect
        uri = f"nbd+unix:///?socket={sock}"
        await run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x42 1000 5000")
        assert "export-size: 8388608" in await run("nbdinfo", uri)
        nbd.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(nbd.wait(), 30) == 0
        async with await SwapClient.connect(server.address, TOKENS["alice"]) as client:
            (info,) = await client.list_areas()
        assert (info.name, info.size_bytes, info.pages_stored) == ("vm9", 8 << 20, 2)
        # and a second run re-attaches it with the data
        nbd = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert nbd.stdout is not None
        while b"serving vm9" not in await asyncio.wait_for(nbd.stdout.readline(), 30):
            pass
        out = await run("qemu-io", "-f", "raw", uri, "-c", "read -P 0x42 1000 5000")
        assert "Pattern verification failed" not in out
    finally:
        if nbd.returncode is None:
            nbd.kill()
            await nbd.wait()
        server.stop_quietly()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
async def test_tcp_listener(tmp_path: Path, host: str) -> None:
    async with (
        running_server(tmp_path) as srv,
        await SwapClient.connect(srv.address, TOKENS["alice"]) as client,
    ):
        options = NbdOptions(name="tcp", size=8 << 20, listen=f"{host}:0")
        nbd = NbdServer(await attach(Fleet({srv.address: client}), options), options)
        where = await nbd.start()
        try:
            listening, port = where.rsplit(":", 1)
            assert listening == host and int(port) > 0
            uri = f"nbd://{host}:{port}/tcp"
            out = await run(
                "qemu-io", "-f", "raw", uri, "-c", "write -P 0x5 0 70000", "-c", "read -P 0x5 0 70000"
            )
            assert "Pattern verification failed" not in out
            assert "export-size: 8388608" in await run("nbdinfo", uri)
        finally:
            await nbd.stop()
            nbd.area.detach()
