"""Read-ahead: sequential reads are answered from windows, and no read ever sees data older
than a write answered before it -- whichever of a window's read and a write reaches the
server first."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from netswap.client import InvalidRequest
from netswap.client.nbd import protocol as p
from netswap.client.nbd.device import AreaDevice, DeviceError
from netswap.client.nbd.readahead import Readahead
from netswap.client.pool import PagePool
from tests.helpers import PS, pattern
from tests.nbdenv import RawClient, server_and_export
from tests.nbdenv import finished as done_by


class ServerLikeArea:
    """The RPC side of an area in memory, ordered as the server orders it: a read takes its
    data when it arrives and answers `read_delay` later; a write lands `write_delay` after it
    arrives and is answered then."""

    def __init__(self, pages: int) -> None:
        self.page_size = PS
        self.size_bytes = pages * PS
        self.max_batch_pages = 64
        self.name = "ordered"
        self.data = bytearray(self.size_bytes)
        self.pool = PagePool(8)
        self.read_delay = 0.0
        self.write_delay = 0.0
        self.refuse_slot = -1  # a read that includes it is refused (INVALID_ARGUMENT)
        self.reads: list[list[int]] = []

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        await asyncio.sleep(self.write_delay)
        blob = b"".join(pages)
        for i, s in enumerate(slots):
            self.data[s * PS : (s + 1) * PS] = blob[i * PS : (i + 1) * PS]

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        self.reads.append(list(slots))
        blob = b"".join(bytes(self.data[s * PS : (s + 1) * PS]) for s in slots)
        await asyncio.sleep(self.read_delay)
        if self.refuse_slot in slots:
            raise InvalidRequest("refused")
        pos = 0
        for view in into:
            view[:] = blob[pos : pos + len(view)]
            pos += len(view)

    async def discard_batch(self, slots: Sequence[int]) -> None:
        await asyncio.sleep(self.write_delay)
        for s in slots:
            self.data[s * PS : (s + 1) * PS] = bytes(PS)

    async def reattach(self) -> bool:
        return False

    async def superseded(self) -> bool:
        return False


def completion() -> tuple[asyncio.Future[None], Callable[[BaseException | None], None]]:
    """A future, and the done(error) callback that settles it."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finished(error: BaseException | None) -> None:
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    return done, finished


def started_read(device: AreaDevice, first: int, count: int) -> tuple[asyncio.Future[None], bytearray]:
    """A read as the NBD connection starts it (the path read-ahead serves)."""
    buf = bytearray(count * PS)
    done, finished = completion()
    device.read(first * PS, count * PS, memoryview(buf), finished)
    return done, buf


async def read(device: AreaDevice, first: int, count: int) -> bytes:
    done, buf = started_read(device, first, count)
    await done
    return bytes(buf)


def started_write(device: AreaDevice, first: int, data: bytes) -> asyncio.Future[None]:
    done, finished = completion()
    device.write(first * PS, len(data), memoryview(bytearray(data)), finished)
    return done


def filled(pages: int) -> ServerLikeArea:
    area = ServerLikeArea(pages)
    area.data[:] = pattern(1, pages)
    return area


async def test_sequential_reads_are_answered_from_windows() -> None:
    area = filled(1024)
    device = AreaDevice(area, readahead_pages=32)
    for first in range(0, 512, 8):
        assert await read(device, first, 8) == bytes(area.data[first * PS : (first + 8) * PS])
    ra = device.readahead
    assert ra is not None
    # Two misses start it; after that, reads come from windows fetched 32 pages at a time.
    assert ra.hits >= 512 - 3 * 32
    assert len(area.reads) < 512 // 8 // 2  # RPCs: far fewer than reads


async def test_random_reads_fetch_nothing_ahead() -> None:
    area = filled(1024)
    device = AreaDevice(area, readahead_pages=32)
    rng = random.Random(7)
    for _ in range(100):
        first = rng.randrange(0, 1024 - 8)
        assert await read(device, first, 8) == bytes(area.data[first * PS : (first + 8) * PS])
    assert device.readahead is not None
    assert device.readahead.fetched <= 2 * 32  # at most a chance pair of neighbours


async def test_a_write_sent_while_a_window_is_read_drops_the_window() -> None:
    area = filled(256)
    area.read_delay = 0.05  # the window's data is taken, its answer takes a while
    device = AreaDevice(area, readahead_pages=32)
    await read(device, 0, 8)
    second, _ = started_read(device, 8, 8)  # sequential: the window [16, 48) goes with it
    await asyncio.sleep(0.01)
    assert any(16 in r for r in area.reads)
    new = pattern(2, 1)
    await started_write(device, 20, new)  # lands before the window's read is answered
    await second
    got = await read(device, 16, 8)
    assert got[4 * PS : 5 * PS] == new


async def test_a_failed_window_read_fails_its_waiters_and_frees_its_buffer() -> None:
    area = filled(256)
    device = AreaDevice(area, readahead_pages=32)
    await read(device, 0, 8)
    area.read_delay = 0.05
    area.refuse_slot = 40  # the window [16, 48) will be refused; the reads themselves not
    second, _ = started_read(device, 8, 8)
    await asyncio.sleep(0.01)
    waiting, _ = started_read(device, 16, 8)  # waits for the window
    await second
    with pytest.raises(DeviceError):  # as its own read would have failed
        await waiting
    ra = device.readahead
    assert ra is not None
    assert len(ra._free) + len(ra._windows) == 2  # the failed window's buffer is back
    assert await read(device, 16, 8) == bytes(area.data[16 * PS : 24 * PS])


async def test_a_failing_completion_does_not_strand_the_other_readers_of_a_window() -> None:
    area = filled(256)
    device = AreaDevice(area, readahead_pages=32)
    await read(device, 0, 8)
    area.read_delay = 0.05
    second, _ = started_read(device, 8, 8)  # and the window [16, 48)
    await asyncio.sleep(0.01)

    def raising(error: BaseException | None) -> None:
        raise RuntimeError("a caller's completion failed")

    device.read(16 * PS, 8 * PS, memoryview(bytearray(8 * PS)), raising)
    waiting, buf = started_read(device, 24, 8)  # waits for the window too
    await second
    await asyncio.wait_for(waiting, 5)
    assert bytes(buf) == bytes(area.data[24 * PS : 32 * PS])


async def test_the_read_that_starts_a_window_does_not_wait_for_it() -> None:
    area = filled(256)
    device = AreaDevice(area, readahead_pages=32)
    await read(device, 0, 8)
    await read(device, 8, 8)
    assert list(range(8, 16)) in area.reads  # a SwapIn of its own, answered first
    assert list(range(16, 48)) in area.reads  # the window, another


@pytest.mark.parametrize("how", ["whole-page write", "partial write", "write-zeroes", "trim"])
async def test_every_kind_of_write_drops_windows_read_while_it_was_on_its_way(how: str) -> None:
    area = filled(256)
    area.write_delay = 0.1  # the server lands the write only after the window was read
    device = AreaDevice(area, readahead_pages=32)
    page = 20
    expect = bytearray(area.data[page * PS : (page + 1) * PS])
    write: asyncio.Future[None]
    if how == "whole-page write":
        expect[:] = pattern(3, 1)
        write = started_write(device, page, bytes(expect))
    elif how == "partial write":
        buf = bytearray(2 * PS)  # the page, then scratch for its edges
        buf[100:600] = b"a" * 500
        expect[100:600] = b"a" * 500
        write = done_by(device.write, page * PS + 100, 500, memoryview(buf))
    elif how == "write-zeroes":
        expect[:] = bytes(PS)
        write = done_by(device.write_zeroes, page * PS, PS, memoryview(bytearray(2 * PS)))
    else:
        expect[:] = bytes(PS)
        write = done_by(device.trim, page * PS, PS)
    await asyncio.sleep(0.02)
    await read(device, 0, 8)
    await read(device, 8, 8)  # the window [16, 48) goes next, with the page still old
    await asyncio.sleep(0.02)
    assert any(16 in r for r in area.reads)
    assert not write.done()
    await write
    got = await read(device, 16, 8)
    assert got[4 * PS : 5 * PS] == bytes(expect)


def test_windows_stay_inside_the_area_and_within_their_number() -> None:
    fetched: list[tuple[int, int]] = []
    pending: list[Callable[[BaseException | None], None]] = []

    def fetch(first: int, count: int, into: memoryview, done: Callable[[BaseException | None], None]) -> None:
        fetched.append((first, count))
        pending.append(done)

    ra = Readahead(PS, 100, 32, fetch=lambda *a: None, fetch_ahead=fetch, schedule=lambda done: None)
    buf = memoryview(bytearray(8 * PS))
    for first in range(0, 96, 8):
        ra.read(first, 8, buf, lambda error: None)
        while pending:
            pending.pop(0)(None)
        assert len(ra._windows) <= 2
    assert all(first + count <= 100 for first, count in fetched)
    assert fetched[-1] == (80, 20)


def test_windows_grow_while_the_reader_keeps_going_and_shrink_when_left_unread() -> None:
    fetched: list[tuple[int, int]] = []
    pending: list[Callable[[BaseException | None], None]] = []

    def fetch(first: int, count: int, into: memoryview, done: Callable[[BaseException | None], None]) -> None:
        fetched.append((first, count))
        pending.append(done)

    ra = Readahead(
        PS, 1000, 8, max_window_pages=32, fetch=lambda *a: None, fetch_ahead=fetch, schedule=lambda done: None
    )
    buf = memoryview(bytearray(4 * PS))
    for first in range(0, 400, 4):
        ra.read(first, 4, buf, lambda error: None)
        while pending:
            pending.pop(0)(None)
        assert len(ra._windows) <= 2
    assert [count for _, count in fetched[:5]] == [8, 16, 32, 32, 32]  # twice as far each time, to the most
    assert all(b == a + n for (a, n), (b, _) in itertools.pairwise(fetched))  # one run, no gaps
    assert ra.hits >= 400 - 8
    for first in (600, 604):  # a run elsewhere starts where the last one got to
        ra.read(first, 4, buf, lambda error: None)
    assert fetched[-1] == (608, 32)
    # Short runs, each leaving its window mostly unread, bring it back to the first size.
    for first in range(700, 1000, 50):
        for page in (first, first + 1):
            ra.read(page, 1, buf[:PS], lambda error: None)
        while pending:
            pending.pop(0)(None)
    assert [count for _, count in fetched[-3:]] == [8, 8, 8]


async def test_a_device_grows_windows_up_to_four_times_the_first_within_one_batch() -> None:
    area = filled(1024)
    device = AreaDevice(area, readahead_pages=8)  # the area's batches: 64 pages
    for first in range(0, 512, 4):
        assert await read(device, first, 4) == bytes(area.data[first * PS : (first + 4) * PS])
    windows = [len(r) for r in area.reads[2:]]  # after the two reads that start the run
    assert windows[:3] == [8, 16, 32] and set(windows[3:]) == {32}
    device = AreaDevice(area, readahead_pages=32)
    assert device.readahead is not None and device.readahead.max_window_pages == 64


async def test_nbd_reads_agree_with_a_model_under_interleaved_writes(tmp_path: Path) -> None:
    """Through the NBD socket and a real server: sequential 8-page reads (what swap-in does)
    with writes to pages just ahead of the reader -- some answered before the next read is
    sent, some still in flight beside it -- against a model."""
    pages = 2048
    async with server_and_export(tmp_path, "file", size=pages * PS, readahead_pages=32) as (_, export):
        c = await RawClient.connect(export.socket)
        await c.handshake()
        model = bytearray(pattern(5, pages))
        chunk = 256
        for first in range(0, pages, chunk):
            c.request(
                p.CMD_WRITE,
                first,
                first * PS,
                chunk * PS,
                payload=bytes(model[first * PS : (first + chunk) * PS]),
            )
            assert (await c.reply())[0] == 0
        rng = random.Random(11)
        cookie = 1 << 20
        for round_ in range(3):
            for first in range(0, pages - 8, 8):
                in_flight = None
                if rng.random() < 0.3:  # a write just ahead of the reader
                    page = min(pages - 1, first + 8 + rng.randrange(0, 64))
                    data = pattern(cookie, 1)
                    model[page * PS : (page + 1) * PS] = data
                    cookie += 1
                    c.request(p.CMD_WRITE, cookie, page * PS, PS, payload=data)
                    in_flight = cookie
                    if rng.random() < 0.5:  # answered before the read goes out
                        assert (await c.reply())[:2] == (0, cookie)
                        in_flight = None
                cookie += 1
                c.request(p.CMD_READ, cookie, first * PS, 8 * PS)
                replies = {}
                for _ in range(2 if in_flight else 1):
                    err, got, data = await c.reply(8 * PS if not in_flight else 0)
                    if got == cookie and in_flight and err == 0:  # the read's payload follows
                        data = await c.reader.readexactly(8 * PS)
                    replies[got] = (err, data)
                err, data = replies[cookie]
                assert err == 0
                assert data == bytes(model[first * PS : (first + 8) * PS]), (round_, first)
                if in_flight:
                    assert replies[in_flight][0] == 0
        ra = export.server.device.readahead
        assert ra is not None
        assert ra.hits > pages  # read-ahead was at work
        await c.close()
