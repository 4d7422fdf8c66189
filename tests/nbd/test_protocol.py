"""The NBD frontend under a hand-driven client: every option, every error, and hostile input."""

from __future__ import annotations

import asyncio
import collections
import itertools
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netswap.client.core import Area
from netswap.client.metrics import COMMANDS, REQUESTS
from netswap.client.nbd import protocol as p
from tests.helpers import PS, pattern
from tests.nbdenv import Export, RawClient, server_and_export

SIZE = 16 << 20


@pytest.fixture
async def export(tmp_path: Path) -> AsyncIterator[Export]:
    async with server_and_export(tmp_path, "memory", size=SIZE, pool_pages=64) as (_, exp):
        yield exp


async def connected(export: Export) -> RawClient:
    c = await RawClient.connect(export.socket)
    await c.handshake()
    return c


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


async def test_options(export: Export) -> None:
    c = await RawClient.connect(export.socket)
    assert await c.greeting() == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    c.send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    listed = await c.option(p.OPT_LIST)
    assert listed == [(p.REP_SERVER, struct.pack(">I", 3) + b"vm1"), (p.REP_ACK, b"")]
    assert (await c.option(p.OPT_LIST, b"x"))[0][0] == p.REP_ERR_INVALID
    assert (await c.option(p.OPT_STRUCTURED_REPLY))[0][0] == p.REP_ERR_UNSUP
    assert (await c.option(99, b"whatever"))[0][0] == p.REP_ERR_UNSUP
    assert (await c.option(p.OPT_STARTTLS))[0][0] == p.REP_ERR_POLICY
    assert (await c.option(p.OPT_INFO, go_data("other")))[0][0] == p.REP_ERR_UNKNOWN
    assert (await c.option(p.OPT_GO, go_data("vm1")[:-1]))[0][0] == p.REP_ERR_INVALID
    bad_count = struct.pack(">I", 3) + b"vm1" + struct.pack(">H", 5)
    assert (await c.option(p.OPT_INFO, bad_count))[0][0] == p.REP_ERR_INVALID
    info = await c.option(p.OPT_INFO, go_data("vm1", (p.INFO_NAME, p.INFO_DESCRIPTION, 77)))
    kinds = {struct.unpack(">H", data[:2])[0]: data[2:] for reply, data in info if reply == p.REP_INFO}
    assert struct.unpack(">QH", kinds[p.INFO_EXPORT])[0] == SIZE
    assert struct.unpack(">III", kinds[p.INFO_BLOCK_SIZE])[:2] == (1, PS)
    assert kinds[p.INFO_NAME] == b"vm1"
    assert b"netswap area vm1" in kinds[p.INFO_DESCRIPTION]
    assert info[-1][0] == p.REP_ACK
    # still in the handshake after INFO: GO with the default ("") name works
    go = await c.option(p.OPT_GO, go_data(""))
    assert go[-1][0] == p.REP_ACK
    c.request(p.CMD_READ, 7, 0, PS)
    assert await c.reply(PS) == (0, 7, bytes(PS))
    await c.close()


async def test_abort_and_export_name(export: Export) -> None:
    c = await RawClient.connect(export.socket)
    await c.greeting()
    c.send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE))
    assert await c.option(p.OPT_ABORT) == [(p.REP_ACK, b"")]
    assert await c.closed_by_server()

    # EXPORT_NAME cannot report an error: an unknown name ends the session
    c = await RawClient.connect(export.socket)
    await c.greeting()
    c.send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE))
    c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 5) + b"wrong")
    assert await c.closed_by_server()

    # without NO_ZEROES the reply is padded to 134 bytes; with it, 10
    for flags, padded in ((p.FLAG_C_FIXED_NEWSTYLE, 124), (p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES, 0)):
        c = await RawClient.connect(export.socket)
        await c.greeting()
        c.send(p.CLIENT_FLAGS.pack(flags))
        c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 3) + b"vm1")
        size, tflags = p.EXPORT_NAME_REPLY.unpack(await c.reader.readexactly(p.EXPORT_NAME_REPLY.size))
        assert size == SIZE and tflags & p.TFLAG_SEND_TRIM
        assert await c.reader.readexactly(padded) == bytes(padded)
        c.request(p.CMD_WRITE, 1, 0, 3, payload=b"abc")
        assert await c.reply() == (0, 1, b"")
        await c.close()


async def test_unknown_client_flags_close(export: Export) -> None:
    c = await RawClient.connect(export.socket)
    await c.greeting()
    c.send(p.CLIENT_FLAGS.pack(0x80))
    assert await c.closed_by_server()


async def test_request_errors_keep_the_connection(export: Export) -> None:
    c = await connected(export)
    max_payload = export.server.export.max_payload
    cases = [
        # (cmd, flags, offset, length, payload, expected error)
        (p.CMD_READ, 0, SIZE - PS, 2 * PS, b"", p.EINVAL),
        (p.CMD_WRITE, 0, SIZE - 10, 20, b"x" * 20, p.ENOSPC),
        (p.CMD_WRITE, p.CMD_FLAG_FUA, 0, 5, b"fives", p.EINVAL),
        (p.CMD_WRITE, 0, 0, max_payload + PS, b"y" * (max_payload + PS), p.EINVAL),
        (p.CMD_READ, 0, 0, max_payload + PS, b"", p.EINVAL),
        (p.CMD_TRIM, 0, SIZE, 1, b"", p.EINVAL),
        (p.CMD_WRITE_ZEROES, 0, SIZE - 1, 2, b"", p.ENOSPC),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO, 0, PS, b"", p.EINVAL),
        (p.CMD_READ, 0x8000, 0, PS, b"", p.EINVAL),
        (42, 0, 0, 0, b"", p.EINVAL),
        (p.CMD_READ, 0, 2**64 - PS, PS, b"", p.EINVAL),
        (p.CMD_READ, 0, 0, 0, b"", 0),
        (p.CMD_WRITE, 0, 0, 0, b"", 0),
        (p.CMD_FLUSH, 0, 0, 0, b"", 0),
    ]
    for i, (cmd, flags, offset, length, payload, errno) in enumerate(cases):
        c.request(cmd, 100 + i, offset, length, flags, payload)
        got = await c.reply()
        assert got[:2] == (errno, 100 + i), (cmd, flags, offset, length)
    # the stream is still in step: a normal write and read work
    c.request(p.CMD_WRITE, 1, 5000, 4, payload=b"okay")
    assert await c.reply() == (0, 1, b"")
    c.request(p.CMD_READ, 2, 5000, 4)
    assert await c.reply(4) == (0, 2, b"okay")
    await c.close()
    # every request is in the latency histogram, by command and outcome
    expected = collections.Counter(
        (COMMANDS.get(cmd, "other"), "error" if errno else "ok") for cmd, *_, errno in cases
    )
    expected["write", "ok"] += 1
    expected["read", "ok"] += 1
    registry = export.server.registry
    for (command, outcome), n in expected.items():
        labels = {"command": command, "outcome": outcome}
        assert registry.get_sample_value(f"{REQUESTS}_count", labels) == n, labels
        assert registry.get_sample_value(f"{REQUESTS}_bucket", {**labels, "le": "+Inf"}) == n
        assert registry.get_sample_value(f"{REQUESTS}_bucket", {**labels, "le": "5.0"}) == n


@pytest.mark.parametrize(
    "garbage",
    [
        p.REQUEST.pack(0xDEADBEEF, 0, p.CMD_READ, 1, 0, PS),  # bad magic
        p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 1 << 30),  # absurd payload
    ],
)
async def test_protocol_violation_closes_only_that_connection(export: Export, garbage: bytes) -> None:
    keep = await connected(export)
    data = pattern(1, 4)
    keep.request(p.CMD_WRITE, 1, 0, len(data), payload=data)
    assert await keep.reply() == (0, 1, b"")

    bad = await connected(export)
    bad.send(garbage)
    assert await bad.closed_by_server()

    keep.request(p.CMD_READ, 2, 0, len(data))
    assert await keep.reply(len(data)) == (0, 2, data)
    await keep.close()


async def test_truncated_request_then_hangup_loses_nothing(export: Export) -> None:
    c = await connected(export)
    c.request(p.CMD_WRITE, 1, 0, PS, payload=pattern(2, 1))
    assert await c.reply() == (0, 1, b"")
    c.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 2, 0, PS)[:20])  # half a header
    await c.close()
    c = await connected(export)
    c.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 3, 0, PS) + b"partial")  # half a payload
    await c.close()
    c = await connected(export)
    c.request(p.CMD_READ, 4, 0, PS)
    assert await c.reply(PS) == (0, 4, pattern(2, 1))
    await c.close()
    # nothing leaked: every page went back to the pool
    pool = export.server.area.pool
    for _ in range(100):
        if pool.free_pages == pool.capacity:
            break
        await asyncio.sleep(0.01)
    assert pool.free_pages == pool.capacity


async def test_pipelined_requests_complete_with_their_own_cookies(export: Export) -> None:
    c = await connected(export)
    n = 200  # far more than the 64-page pool: the frontend must pace itself, not queue
    for i in range(n):
        c.request(p.CMD_WRITE, 1000 + i, i * PS, PS, payload=pattern(i, 1))
    done = set()
    for _ in range(n):
        err, cookie, _ = await c.reply()
        assert err == 0
        done.add(cookie)
    assert done == {1000 + i for i in range(n)}
    for i in range(n):
        c.request(p.CMD_READ, 5000 + i, i * PS, PS)
    seen = {}
    for _ in range(n):
        err, cookie, data = await c.reply(PS)
        assert err == 0
        seen[cookie] = data
    assert all(seen[5000 + i] == pattern(i, 1) for i in range(n))
    # coalesced: far fewer RPCs than requests
    device = export.server.device
    assert device.rpcs["out"] < n and device.rpcs["in"] < n
    assert export.server.area.pool.capacity == 64
    await c.close()


async def test_disconnect_finishes_accepted_writes(export: Export) -> None:
    c = await connected(export)
    for i in range(50):
        c.request(p.CMD_WRITE, i, i * PS, PS, payload=pattern(100 + i, 1))
    c.request(p.CMD_DISC, 999, 0, 0)
    # replies for the writes may still arrive; then the server closes
    while (await c.reader.read(65536)) != b"":
        pass
    await c.close()
    c = await connected(export)
    for first in range(0, 50, 10):
        c.request(p.CMD_READ, first, first * PS, 10 * PS)
        expected = b"".join(pattern(100 + i, 1) for i in range(first, first + 10))
        assert await c.reply(10 * PS) == (0, first, expected)
    await c.close()


async def test_a_client_that_never_reads_stalls_only_itself(export: Export) -> None:
    flood = await connected(export)
    for i in range(400):  # 400 x 32 KiB of replies it will not read for now
        flood.request(p.CMD_READ, i, 0, 8 * PS)
    await asyncio.sleep(0.5)
    pool = export.server.area.pool
    assert pool.capacity == 64  # nothing grew; the pool is the bound
    other = await connected(export)
    other.request(p.CMD_WRITE, 1, PS * 100, 3, payload=b"hey")
    # the other connection shares the pool: it may wait, but it is served
    assert await asyncio.wait_for(other.reply(), 30) == (0, 1, b"")
    for _ in range(400):
        err, _, data = await asyncio.wait_for(flood.reply(8 * PS), 30)
        assert err == 0 and len(data) == 8 * PS
    assert pool.free_pages == pool.capacity
    await flood.close()
    await other.close()


async def test_requests_that_arrive_together_share_one_rpc(export: Export) -> None:
    c = await connected(export)
    device = export.server.device
    before = device.rpcs["out"]
    burst = b"".join(
        p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, i, (10 + 2 * i) * PS, PS) + pattern(i, 1)
        for i in range(8)
    )
    c.send(burst)  # one write(2): eight requests in one socket read
    for _ in range(8):
        assert (await c.reply())[0] == 0
    assert device.rpcs["out"] - before == 1
    await c.close()


async def test_unaligned_writes_to_one_page_from_two_connections_both_land(export: Export) -> None:
    a, b = await connected(export), await connected(export)
    for round_ in range(20):
        base = 200 * PS + round_ * PS
        for i in range(8):  # interleaved byte ranges of the same page, from both connections
            (a if i % 2 else b).request(
                p.CMD_WRITE, i, base + i * 500, 500, payload=bytes([round_ * 8 + i + 1]) * 500
            )
        for i in range(8):
            assert (await (a if i % 2 else b).reply())[0] == 0
        a.request(p.CMD_READ, 99, base, 4000)
        _, _, data = await a.reply(4000)
        assert data == b"".join(bytes([round_ * 8 + i + 1]) * 500 for i in range(8))
    await a.close()
    await b.close()


async def test_a_burst_of_whole_page_and_partial_writes_to_one_page_lands_whole(export: Export) -> None:
    # Whole-page writes queue at once, partial ones read-modify-write in a
    # task of their own: mixed on one page, each must still land whole.
    c = await connected(export)
    writes = [(100, b"a" * 500), (0, b"b" * PS), (2000, b"c" * 500), (0, b"d" * PS), (3000, b"e" * 96)]
    for round_ in range(20):
        base = (300 + round_) * PS
        old = pattern(round_, 1)
        c.request(p.CMD_WRITE, 0, base, PS, payload=old)
        assert (await c.reply())[0] == 0
        # One burst: all five are in flight together, so any order is allowed,
        # but each must land whole.
        c.send(
            b"".join(
                p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, i, base + at, len(data)) + data
                for i, (at, data) in enumerate(writes)
            )
        )
        for _ in writes:
            assert (await c.reply())[0] == 0
        c.request(p.CMD_READ, 9, base, PS)
        _, _, got = await c.reply(PS)
        # Writes that land whole leave, at each byte, the last writer's byte:
        # the last whole-page write and the partial writes after it.
        outcomes = set()
        for order in itertools.permutations(range(len(writes))):
            page = bytearray(old)
            for i in order:
                at, data = writes[i]
                page[at : at + len(data)] = data
            outcomes.add(bytes(page))
        assert got in outcomes, f"round {round_}: a write was partly undone"
    await c.close()


async def test_a_write_parsed_after_a_trim_of_its_page_lands_after_it(export: Export) -> None:
    # TRIM takes its pages in a task, a whole-page write would take them at
    # once: arriving together, the write must still not let the trim pass it.
    c = await connected(export)
    for round_ in range(10):
        base = (400 + round_) * PS
        data = pattern(round_, 1)
        c.send(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_TRIM, 1, base, PS)
            + p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 2, base, PS)
            + data
        )
        assert sorted([(await c.reply())[:2] for _ in range(2)]) == [(0, 1), (0, 2)]
        c.request(p.CMD_READ, 3, base, PS)
        assert (await c.reply(PS))[2] == data, f"round {round_}: the trim overtook the write"
    await c.close()


async def test_disconnect_is_never_answered(export: Export) -> None:
    c = await connected(export)
    c.request(p.CMD_DISC, 1, SIZE * 2, 12345)  # nonsense fields: still no reply
    assert await c.reader.read(100) == b""
    await c.close()


async def test_oversized_unknown_option_is_refused_not_fatal(export: Export) -> None:
    c = await RawClient.connect(export.socket)
    await c.greeting()
    c.send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    assert (await c.option(77, b"z" * 100_000))[0][0] == p.REP_ERR_TOO_BIG
    assert (await c.option(p.OPT_LIST))[-1][0] == p.REP_ACK  # still in step
    await c.close()


async def test_same_filled_pages_round_trip_through_the_frontend(export: Export) -> None:
    # Zero pages and pages of one repeated word travel as words (they are what swap
    # sends most): pipelined so that requests share batches, with readahead windows
    # and unaligned reads cutting across them.
    c = await connected(export)
    kinds = [pattern(1, 1), bytes(PS), b"word-one" * (PS // 8), pattern(2, 1), bytes(PS), bytes(PS)]
    data = b"".join(kinds * 4)
    for i in range(0, len(data), 3 * PS):
        c.request(p.CMD_WRITE, i, i, 3 * PS, payload=data[i : i + 3 * PS])
    assert sorted([(await c.reply())[:2] for _ in range(0, len(data), 3 * PS)]) == [
        (0, i) for i in range(0, len(data), 3 * PS)
    ]
    for n, i in enumerate(range(0, len(data), PS)):  # page by page, in order: read ahead
        c.request(p.CMD_READ, n, i, PS)
        assert await c.reply(PS) == (0, n, data[i : i + PS])
    c.request(p.CMD_READ, 99, PS + 100, 5 * PS)
    assert await c.reply(5 * PS) == (0, 99, data[PS + 100 : 6 * PS + 100])
    await c.close()
    area = export.server.area
    assert isinstance(area, Area) and area.takes_same_pages
