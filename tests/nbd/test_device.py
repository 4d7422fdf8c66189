"""AreaDevice on its own: failures inside split requests, deadlines, takeover by another client."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from netswap.client import ConnectionLost, SwapClient
from netswap.client.nbd import protocol as p
from netswap.client.nbd.device import AreaDevice, DeviceError
from netswap.client.nbd.locks import RangeLocks
from netswap.client.pool import PagePool
from tests.helpers import PS, TOKENS, pattern, running_server
from tests.nbdenv import RawClient, finished, nbd_export


class FlakyArea:
    """The RPC side of an area, in memory, failing on command (the device is what is tested)."""

    def __init__(self, pages: int, max_batch_pages: int) -> None:
        self.page_size = PS
        self.size_bytes = pages * PS
        self.max_batch_pages = max_batch_pages
        self.name = "flaky"
        self.data = bytearray(self.size_bytes)
        self.down = False
        self.fail_slots: set[int] = set()
        self.delay = 0.0
        self.pool = PagePool(8)
        self.sent: list[Sequence[int]] = []  # the slots of every batch, as the device gave them

    async def reattach(self) -> bool:
        return False

    async def superseded(self) -> bool:
        return False

    async def _maybe_fail(self, slots: Sequence[int]) -> None:
        await asyncio.sleep(self.delay)
        if self.down or self.fail_slots & set(slots):
            raise ConnectionLost("server down (UNAVAILABLE)")

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        self.sent.append(slots)
        await self._maybe_fail(slots)
        blob = b"".join(pages)
        for i, s in enumerate(slots):
            self.data[s * PS : (s + 1) * PS] = blob[i * PS : (i + 1) * PS]

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        await self._maybe_fail(slots)
        blob = b"".join(bytes(self.data[s * PS : (s + 1) * PS]) for s in slots)
        pos = 0
        for view in into:
            view[:] = blob[pos : pos + len(view)]
            pos += len(view)

    async def discard_batch(self, slots: Sequence[int]) -> None:
        await self._maybe_fail(slots)


async def test_a_failed_part_does_not_release_the_request_early() -> None:
    area = FlakyArea(64, max_batch_pages=4)
    device = AreaDevice(area, retry_deadline=0.3)
    area.fail_slots = {0}  # the first of two parts fails (after retrying until the deadline)
    area.delay = 0.05
    buf = bytearray(8 * PS)
    with pytest.raises(DeviceError) as err:
        await finished(device.read, 0, 8 * PS, memoryview(buf))
    assert err.value.errno == p.EIO
    # the second part was finished before the request said so: the buffer is quiet now
    snapshot = bytes(buf)
    await asyncio.sleep(0.2)
    assert bytes(buf) == snapshot


async def test_the_retry_deadline_counts_from_when_a_request_arrived() -> None:
    area = FlakyArea(64, max_batch_pages=1)
    device = AreaDevice(area, retry_deadline=1.0, max_rpcs=1)  # one RPC at a time: requests queue
    area.down = True
    loop = asyncio.get_running_loop()
    start = loop.time()
    reads = [finished(device.read, i * PS, PS, memoryview(bytearray(PS))) for i in range(12)]
    results = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(r, DeviceError) and r.errno == p.EIO for r in results)
    assert loop.time() - start < 2.5  # not 12 waves of 1 s


async def test_another_client_taking_the_area_over_fails_the_device(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path) as srv,
        nbd_export(srv.address, tmp_path / "a.sock", size=8 << 20) as first,
    ):
        c = await RawClient.connect(first.socket)
        await c.handshake()
        c.request(p.CMD_WRITE, 1, 0, PS, payload=pattern(1, 1))
        assert (await c.reply())[0] == 0
        # a second frontend attaches the same area: the server hands it a new handle
        async with nbd_export(srv.address, tmp_path / "b.sock", size=8 << 20) as second:
            c.request(p.CMD_WRITE, 2, PS, PS, payload=pattern(2, 1))
            assert (await c.reply())[0] == p.EIO  # no tug of war: the first one stops
            assert first.server.device.failed is not None
            assert "attached by another client" in first.server.device.failed
            d = await RawClient.connect(second.socket)
            await d.handshake()
            d.request(p.CMD_READ, 3, 0, PS)
            assert await d.reply(PS) == (0, 3, pattern(1, 1))  # the winner has the data
            assert second.server.device.reattaches == 0
            await d.close()
        await c.close()


async def test_queued_parts_are_recut_when_the_batch_limit_shrinks(tmp_path: Path) -> None:
    # A re-attach can bring a smaller max_batch_pages (the server restarted with
    # another setting) while parts cut for the old one are queued.
    async with running_server(tmp_path, "file", max_batch_pages=8) as srv:
        client = await SwapClient.connect(srv.address, TOKENS["alice"])
        area = await client.swapon("vm1", 1 << 20)
        device = AreaDevice(area)
        data = pattern(3, 40)
        await finished(device.write, 0, len(data), memoryview(bytearray(data)))
        area.max_batch_pages = 64  # as learned from an earlier server start
        out = bytearray(len(data))
        read = finished(device.read, 0, len(data), memoryview(out))  # queued as one 40-page part
        area.max_batch_pages = 8  # ... and then the limit shrinks, before its batch is cut
        await read
        assert out == data
        assert device.rpcs["in"] == 5
        assert device.batches._queued == 0  # the count of queued parts came back even
        await finished(device.read, 0, PS, memoryview(bytearray(PS)))  # and the device still serves
        area.detach()
        await client.close()


async def test_a_batch_of_adjacent_parts_is_one_run() -> None:
    area = FlakyArea(64, max_batch_pages=8)
    device = AreaDevice(area, max_rpcs=1)  # one RPC at a time: what arrives meanwhile is batched
    area.delay = 0.05

    async def writes(*firsts: int) -> None:
        await asyncio.gather(
            *(finished(device.write, f * PS, 2 * PS, memoryview(pattern(f, 2))) for f in firsts)
        )

    await writes(0, 2, 4)  # one batch, no gaps: one run
    await writes(20, 30, 40)  # one batch with gaps: listed
    assert area.sent == [range(0, 6), [20, 21, 30, 31, 40, 41]]
    for f in (0, 2, 4, 20, 30, 40):
        assert area.data[f * PS : (f + 2) * PS] == pattern(f, 2)


@pytest.mark.parametrize("big", [8, RangeLocks.SMALL + 1, 10_000])
async def test_range_locks_exclude_overlaps_of_any_size(big: int) -> None:
    # Small ranges are indexed by page and long ones listed: every pairing of
    # the two must still see an overlap, including a long range against a
    # single page at either end.
    locks = RangeLocks()
    held = locks.try_acquire(100, big)
    assert held is not None
    for first, count in [(100, 1), (99 + big, 1), (50, 51), (99 + big, 500), (0, 100_000)]:
        assert locks.try_acquire(first, count) is None, (first, count)
    for first, count in [(99, 1), (100 + big, 1), (0, 100), (100 + big, 100_000)]:
        other = locks.try_acquire(first, count)
        assert other is not None, (first, count)
        locks.release(other)
    waiter = asyncio.ensure_future(locks.acquire(99 + big, 2))  # its last page, and one more
    await asyncio.sleep(0.01)
    assert not waiter.done()  # waits for the holder
    locks.release(held)
    taken = await asyncio.wait_for(waiter, 1)
    locks.release(taken)
    assert locks.try_acquire(0, 100_000) is not None  # nothing left held


async def test_a_whole_page_write_waits_for_a_read_modify_write_of_its_page() -> None:
    # A whole-page write skips the task and queues at once -- but not past a
    # partial write of its page in progress, whose write-back would put the
    # page's old bytes over it.
    area = FlakyArea(8, max_batch_pages=4)
    old = pattern(1, 1)
    area.data[3 * PS : 4 * PS] = old
    area.delay = 0.05  # each RPC takes a while: the read-modify-write is slow
    device = AreaDevice(area)
    partial_buf = bytearray(2 * PS)  # the page, then scratch for its edge
    partial_buf[100:600] = b"a" * 500
    partial = finished(device.write, 3 * PS + 100, 500, memoryview(partial_buf))
    await asyncio.sleep(0.01)  # it holds the page; its read is on the way
    whole = memoryview(bytearray(b"b" * PS))
    await finished(device.write, 3 * PS, PS, whole)  # on the path that waits for the page
    await partial
    b_then_a = bytearray(b"b" * PS)
    b_then_a[100:600] = b"a" * 500
    assert bytes(area.data[3 * PS : 4 * PS]) in (b"b" * PS, bytes(b_then_a))
