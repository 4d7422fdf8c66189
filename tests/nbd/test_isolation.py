"""The NBD frontend's bounds: idle handshakes cannot lock a client out, every command holds pool
pages, and an address other hosts can reach needs saying so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from netswap.client.nbd import protocol as p
from netswap.client.nbd.serve import NbdOptions
from tests.helpers import PS
from tests.nbdenv import RawClient, run, server_and_export


async def test_idle_handshakes_are_dropped_and_never_keep_a_real_client_out(tmp_path: Path) -> None:
    async with server_and_export(tmp_path, "memory", size=8 << 20, handshake_timeout=1.0) as (_, export):
        idle = [await RawClient.connect(export.socket) for _ in range(16)]  # sockets opened, then nothing
        for c in idle:
            await c.greeting()
        # A real client gets in at once: the idlers waiting longest make room.
        assert "export-size: 8388608" in await run("nbdinfo", export.uri)
        assert sum(conn.in_handshake for conn in export.server.connections) <= 4
        # And whoever is still idle after the timeout is dropped.
        for c in idle[-4:]:
            assert await asyncio.wait_for(c.closed_by_server(), 10)
        assert not export.server.connections
        for c in idle[:-4]:
            await c.close()


async def test_a_client_past_the_limit_is_refused_at_go_and_the_others_go_on(tmp_path: Path) -> None:
    async with server_and_export(tmp_path, "memory", size=8 << 20, max_connections=1) as (_, export):
        first = await RawClient.connect(export.socket)
        await first.handshake()
        second = await RawClient.connect(export.socket)
        await second.greeting()
        second.send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        name = b"vm1"
        go = len(name).to_bytes(4, "big") + name + bytes(2)
        assert (await second.option(p.OPT_GO, go))[0][0] == p.REP_ERR_POLICY
        assert await second.closed_by_server()
        first.request(p.CMD_WRITE, 1, 0, PS, payload=bytes(range(256)) * 16)
        assert await first.reply() == (0, 1, b"")
        await first.close()


async def test_trims_and_write_zeroes_are_bounded_by_the_pool(tmp_path: Path) -> None:
    pool = 64  # each of the 4 possible connections may hold 16 pages
    async with server_and_export(tmp_path, "memory", size=8 << 20, pool_pages=pool) as (_, export):
        c = await RawClient.connect(export.socket)
        await c.handshake()
        (conn,) = export.server.connections
        most = 0
        sent = 20_000
        for i in range(sent):  # pipelined, no reply read until all are sent
            cmd = p.CMD_TRIM if i % 2 else p.CMD_WRITE_ZEROES
            c.request(cmd, i, (i % 2048) * PS, PS)
            if i % 500 == 0:
                await asyncio.sleep(0)
                most = max(most, conn.busy)
        replies = 0
        while replies < sent:
            most = max(most, conn.busy)
            errno, _, _ = await c.reply()
            assert errno == 0
            replies += 1
        assert 0 < most <= export.server.budget_pages  # never more in progress than pool pages it may hold
        assert export.server.area.pool.free_pages == pool
        await c.close()


def test_listening_beyond_loopback_needs_allow_remote() -> None:
    for address in ("0.0.0.0:10809", "10.1.2.3:10809", "[::]:10809"):
        with pytest.raises(ValueError, match="--allow-remote"):
            NbdOptions(name="vm1", size=PS, listen=address)
        NbdOptions(name="vm1", size=PS, listen=address, allow_remote=True)
    for address in ("127.0.0.1:10809", "localhost:10809", "[::1]:10809"):
        NbdOptions(name="vm1", size=PS, listen=address)


def test_options_that_could_not_serve_are_refused() -> None:
    for bad in ({"max_connections": 0}, {"max_rpcs": 0}, {"pool_pages": 32, "max_connections": 9}):
        with pytest.raises(ValueError, match="must be at least"):
            NbdOptions(name="vm1", size=PS, **bad)  # type: ignore[arg-type]
    NbdOptions(name="vm1", size=PS, pool_pages=32, max_connections=8)  # four pages each: enough
