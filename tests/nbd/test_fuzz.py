"""The NBD frontend under random bytes: every connection that sends garbage is answered or
closed, the frontend keeps serving others, and what was written before stays intact."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netswap.client.nbd import protocol as p
from tests.helpers import PS, pattern
from tests.nbdenv import Export, RawClient, server_and_export

SIZE = 8 << 20
# Where the data that must stay intact lives: past every page the hostile requests below
# may validly change (offsets up to PS - 1, lengths up to 2 * PS + 3), bar the whole device.
DATA_AT = 16 * PS


def wipes_all(chunk: bytes) -> bool:
    """A valid trim or zero request that reaches the data (only the whole device's does)."""
    magic, _, cmd, _, offset, length = p.REQUEST.unpack_from(chunk)
    reaches = DATA_AT < offset + length <= SIZE
    return magic == p.REQUEST_MAGIC and cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES) and reaches


# Requests that look almost right: real magic and commands, hostile fields.
requests = st.builds(
    lambda magic, flags, cmd, offset, length, payload: (
        p.REQUEST.pack(magic, flags, cmd, 7, offset, length) + payload
    ),
    magic=st.sampled_from([p.REQUEST_MAGIC, p.REQUEST_MAGIC, 0, 0xFFFFFFFF]),
    flags=st.sampled_from([0, 1, 2, 0x10, 0xFFFF]),
    cmd=st.integers(0, 12),
    offset=st.sampled_from([0, 1, PS - 1, SIZE - 1, SIZE, 2**63, 2**64 - 1]),
    length=st.sampled_from([0, 1, PS, 2 * PS + 3, SIZE, 2**31, 2**32 - 1]),
    payload=st.binary(max_size=64),
).filter(lambda chunk: not wipes_all(chunk))
options = st.builds(
    lambda magic, option, length, data: p.OPTION_HEADER.pack(magic, option, length) + data,
    magic=st.sampled_from([p.IHAVEOPT, p.IHAVEOPT, 0]),
    option=st.integers(0, 12),
    length=st.sampled_from([0, 3, 6, 4096, 2**20, 2**32 - 1]),
    data=st.binary(max_size=64),
)


async def hostile(export: Export, during_handshake: bool, chunks: list[bytes]) -> None:
    c = await RawClient.connect(export.socket)
    try:
        if during_handshake:
            await c.greeting()
        else:
            await c.handshake()
        for chunk in chunks:
            c.send(chunk)
        with contextlib.suppress(ConnectionError):
            await c.writer.drain()
        # Whatever it answers (replies or a hang-up) must come without stalling.
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(c.reader.read(1 << 16), 0.2)
    finally:
        await c.close()


async def intact(export: Export, data: bytes) -> None:
    c = await RawClient.connect(export.socket)
    try:
        await c.handshake()
        c.request(p.CMD_READ, 1, DATA_AT, len(data))
        assert await asyncio.wait_for(c.reply(len(data)), 10) == (0, 1, data)
    finally:
        await c.close()  # also when it fails: a socket left open fails the next test instead


def test_random_handshakes_and_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with server_and_export(tmp_path, "memory", size=SIZE, pool_pages=64) as (_, export):
            data = pattern(9, 3)
            c = await RawClient.connect(export.socket)
            await c.handshake()
            c.request(p.CMD_WRITE, 1, DATA_AT, len(data), payload=data)
            assert await c.reply() == (0, 1, b"")
            await c.close()

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                during_handshake=st.booleans(),
                chunks=st.lists(st.one_of(requests, options, st.binary(max_size=40)), min_size=1, max_size=6),
            )
            def one(during_handshake: bool, chunks: list[bytes]) -> None:
                loop = asyncio.get_event_loop()
                fut = asyncio.run_coroutine_threadsafe(hostile(export, during_handshake, chunks), loop)
                fut.result(timeout=30)

            # Hypothesis is synchronous: drive it from a worker thread while the
            # servers keep running on this loop.
            loop = asyncio.get_running_loop()

            def drive() -> None:
                asyncio.set_event_loop(loop)
                one()

            await asyncio.to_thread(drive)
            await intact(export, data)
            pool = export.server.area.pool
            for _ in range(200):
                if pool.free_pages == pool.capacity:
                    break
                await asyncio.sleep(0.01)
            assert pool.free_pages == pool.capacity, "pool pages leaked"

    asyncio.run(scenario())
