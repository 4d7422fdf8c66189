"""An area as a byte-addressed block device: what the NBD connection calls.

Every operation has one shape: op(..., done), and done(error) runs once it
is over -- error None, or a DeviceError carrying the NBD errno. Byte ranges
become slot ranges; writes that do not cover whole pages are
read-modify-write, serialized against overlapping requests by range locks
(locks.py). The common requests -- every read, whole-page writes on pages
nobody holds -- queue straight into the batcher (batcher.py) with their
`done`: a task per request would cost more than everything else the
frontend does for it. The others run in tasks of their own. Server requests
retry while the server is away and re-attach after it restarts (retry.py);
sequential reads are read ahead (readahead.py).

Buffers are the caller's (leased from the area's page pool by the NBD
connection) or read-ahead windows allocated at start: this module never
allocates page memory while serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from netswap.client.nbd.batcher import DISCARD, READ, WRITE, BatchArea, Batcher, Done, Kind
from netswap.client.nbd.locks import RangeLocks
from netswap.client.nbd.protocol import EIO
from netswap.client.nbd.readahead import Readahead
from netswap.client.nbd.retry import DeviceError, Resilience
from netswap.common import loopmetrics
from netswap.common.limits import PAGE_SIZE

__all__ = ["AreaDevice", "BatchArea", "DeviceError"]

_ZERO_PAGE = memoryview(bytes(PAGE_SIZE))  # zero-fill source: zeroing allocates nothing
READAHEAD_GROWTH = 4  # a window grows to this many times --readahead-pages


class AreaDevice:
    def __init__(
        self,
        area: BatchArea,
        *,
        retry_deadline: float = 60.0,
        max_rpcs: int = 2,
        on_batch: loopmetrics.Histogram | None = None,
        readahead_pages: int = 0,
    ) -> None:
        self.area = area
        self.page_size = area.page_size
        self.size = area.size_bytes
        self.link = Resilience(area)
        # Windows of at most one batch: each is one SwapIn. They grow, while a reader
        # keeps going, to READAHEAD_GROWTH times the first (see readahead.py).
        window = min(readahead_pages, area.max_batch_pages)
        self.readahead = (
            Readahead(
                self.page_size,
                self.size // self.page_size,
                window,
                max_window_pages=min(READAHEAD_GROWTH * window, area.max_batch_pages),
                fetch=self._queue_read,
                fetch_ahead=self._queue_read_ahead,
                schedule=lambda done: asyncio.get_running_loop().call_soon(done, None),
            )
            if window > 0
            else None
        )
        self.batches = Batcher(
            area,
            self.link,
            retry_deadline=retry_deadline,
            max_rpcs=max_rpcs,
            on_batch=on_batch,
            on_written=self.readahead.invalidate if self.readahead is not None else None,
        )
        # The connection holds the batcher while it parses one socket read (Batcher.hold).
        self.hold = self.batches.hold
        self.release = self.batches.release
        self._locks = RangeLocks()
        self._ordered = 0  # lock-taking requests called and not yet finished (see write())
        self._tasks: set[asyncio.Task[None]] = set()

    # -- state, for metrics and the connection ----------------------------------------

    @property
    def failed(self) -> str | None:
        return self.link.failed

    @property
    def server_up(self) -> bool:
        return self.link.server_up

    @property
    def retries(self) -> int:
        return self.link.retries

    @property
    def reattaches(self) -> int:
        """Fresh handles obtained since start (one per server restart survived)."""
        return self.link.generation

    @property
    def rpcs(self) -> dict[str, int]:
        return self.batches.rpcs

    # -- geometry -----------------------------------------------------------------

    def span(self, offset: int, length: int) -> tuple[int, int, int]:
        """(first page, pages covering [offset, offset+length), offset within the first page)."""
        ps = self.page_size
        first = offset // ps
        last = (offset + length - 1) // ps
        return first, last - first + 1, offset - first * ps

    def edges(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """The span's pages that [offset, offset+length) covers only in part -- at most the
        first and the last: (index in the span, start, end) of the range within that page."""
        ps = self.page_size
        _, count, skip = self.span(offset, length)
        end = skip + length
        out = []
        for i in sorted({0, count - 1}):
            lo, hi = max(skip - i * ps, 0), min(end - i * ps, ps)
            if lo > 0 or hi < ps:
                out.append((i, lo, hi))
        return out

    def partial_edges(self, offset: int, length: int) -> int:
        """How many scratch pages a write of this range needs for read-modify-write (0-2)."""
        return len(self.edges(offset, length))

    def write_pages(self, offset: int, length: int) -> int:
        """Pool pages a write of this range needs: its span, plus scratch for partial edges."""
        ps = self.page_size
        if offset % ps == 0 and length % ps == 0:
            return length // ps
        return self.span(offset, length)[1] + self.partial_edges(offset, length)

    # -- operations ---------------------------------------------------------------

    def read(self, offset: int, length: int, pages: memoryview, done: Done) -> None:
        """Fill `pages` (the span's whole pages) from the area."""
        if self.link.failed:
            self._fail_soon(done)
            return
        first, count, _ = self.span(offset, length)
        if self.readahead is not None:
            self.readahead.read(first, count, pages, done)
        else:
            self.batches.queue(READ, first, count, pages, done)

    def write(self, offset: int, length: int, buf: memoryview, done: Done) -> None:
        """Write bytes [offset, offset+length).

        `buf` holds span pages followed by partial_edges() scratch pages; the
        payload already sits at buf[skip : skip+length]. Edge bytes outside
        the payload are filled from the area first (read-modify-write).
        """
        ps = self.page_size
        if not (offset % ps or length % ps or self.link.failed or self._ordered):
            first, count = offset // ps, length // ps
            held = self._locks.try_acquire(first, count)
            if held is not None:  # whole pages nobody holds: no task needed

                def finished(error: BaseException | None) -> None:
                    self._locks.release(held)
                    done(error)

                self.batches.queue(WRITE, first, count, buf[:length], finished)
                return
        self._in_order(self._write(offset, length, buf), done)

    def write_zeroes(self, offset: int, length: int, scratch: memoryview, done: Done) -> None:
        """Zero bytes [offset, offset+length): whole pages are discarded (they read as zeros and
        stay reserved); partial edge pages are read, zeroed in part and written back using
        `scratch` (partial_edges() pages)."""
        self._in_order(self._write_zeroes(offset, length, scratch), done)

    def trim(self, offset: int, length: int, done: Done) -> None:
        """Discard the whole pages inside the range; partial pages are left as they are (TRIM only
        says the client no longer cares about the contents)."""
        self._in_order(self._trim(offset, length), done)

    # Requests that take range locks run in tasks of their own and count from
    # the call -- when the connection parses them -- not from their task's
    # first step: while any is pending, write() takes no fast path, so a
    # whole-page write parsed after, say, a TRIM of its page cannot take the
    # page first; it queues behind in a task.

    def _in_order(self, work: Coroutine[Any, Any, None], done: Done) -> None:
        self._ordered += 1
        started = False

        async def run() -> None:
            nonlocal started
            started = True
            error: BaseException | None = None
            try:
                await work
            except DeviceError as e:
                error = e
            except asyncio.CancelledError:
                error = DeviceError(EIO, "the frontend is stopping")
                raise
            except Exception as e:
                error = e
            finally:
                self._ordered -= 1
                done(error)

        def ended(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not started:  # cancelled before its first step: run() never answered it
                work.close()
                self._ordered -= 1
                done(DeviceError(EIO, "the frontend is stopping"))

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(ended)

    async def _write(self, offset: int, length: int, buf: memoryview) -> None:
        ps = self.page_size
        first, count, _ = self.span(offset, length)
        data = buf[: count * ps]
        held = await self._locks.acquire(first, count)
        try:
            scratch = count * ps
            for i, lo, hi in self.edges(offset, length):
                # An edge page keeps its stored bytes outside the payload.
                page = data[i * ps : (i + 1) * ps]
                spare = buf[scratch : scratch + ps]
                await self._submit(READ, first + i, 1, spare)
                for keep_lo, keep_hi in ((0, lo), (hi, ps)):
                    page[keep_lo:keep_hi] = spare[keep_lo:keep_hi]
                scratch += ps
            await self._submit(WRITE, first, count, data)
        finally:
            self._locks.release(held)

    async def _write_zeroes(self, offset: int, length: int, scratch: memoryview) -> None:
        ps = self.page_size
        first, count, _ = self.span(offset, length)
        edges = self.edges(offset, length)
        held = await self._locks.acquire(first, count)
        try:
            for n, (i, lo, hi) in enumerate(edges):
                page = scratch[n * ps : (n + 1) * ps]
                await self._submit(READ, first + i, 1, page)
                page[lo:hi] = _ZERO_PAGE[: hi - lo]
                await self._submit(WRITE, first + i, 1, page)
            # Whole pages in between: neither the first nor the last if those are edges.
            full_lo = first + (1 if edges and edges[0][0] == 0 else 0)
            full_hi = first + count - (1 if edges and edges[-1][0] == count - 1 else 0)
            if full_hi > full_lo:
                await self._submit(DISCARD, full_lo, full_hi - full_lo, None)
        finally:
            self._locks.release(held)

    async def _trim(self, offset: int, length: int) -> None:
        ps = self.page_size
        lo = -(-offset // ps)
        hi = (offset + length) // ps
        if hi > lo:
            held = await self._locks.acquire(lo, hi - lo)
            try:
                await self._submit(DISCARD, lo, hi - lo, None)
            finally:
                self._locks.release(held)

    async def _submit(self, kind: Kind, first: int, count: int, view: memoryview | None) -> None:
        self.link.check()
        future = asyncio.get_running_loop().create_future()
        self.batches.queue(kind, first, count, view, partial(_settle, future))
        await future

    def _queue_read(self, first: int, count: int, into: memoryview, done: Done) -> None:
        self.batches.queue(READ, first, count, into, done)

    def _queue_read_ahead(self, first: int, count: int, into: memoryview, done: Done) -> None:
        self.batches.queue(READ, first, count, into, done, alone=True)

    def _fail_soon(self, done: Callable[[BaseException | None], None]) -> None:
        """Fail a request on a later turn of the loop (never inside the caller's own call)."""
        error = DeviceError(EIO, self.link.failed or "the device has failed")
        asyncio.get_running_loop().call_soon(done, error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if not future.done():  # a caller that was cancelled no longer listens
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
