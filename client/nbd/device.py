"""An area as a byte-addressed block device: what the NBD connection calls.

- Byte ranges become slot ranges; writes that do not cover whole pages are
  read-modify-write, serialized against overlapping writes by range locks.
- NBD requests are not sent to the server one each: they queue as *parts*
  (slot ranges with their buffers), and whenever fewer than `max_rpcs` server
  requests are in flight the queue is cut into batches of up to
  max_batch_pages pages -- one SwapOut / SwapIn / Discard each, on the
  client's PageStream. NBD requests that arrive together (or while the
  server is busy) share a batch; nothing waits on a timer.
- Every server request retries with bounded backoff while the server is unreachable, up
  to `retry_deadline`; a handle the server no longer knows (it restarted) is
  replaced by re-attaching the area. If re-attaching finds the area gone, the
  device fails every request from then on: serving zeros for swapped-out
  pages would corrupt the client's memory.
- Sequential reads are read ahead (readahead.py): windows of pages fetched
  in SwapIns of their own and dropped by every write that overlaps them.
- Buffers are the caller's (leased from the area's page pool by the NBD
  connection), or read-ahead windows allocated at start; this module never
  allocates page memory while serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, Protocol, TypeVar

from netswap.client.errors import AreaNotFound, ConnectionLost, InvalidRequest, NetswapError
from netswap.client.nbd.protocol import EINVAL, EIO
from netswap.client.nbd.readahead import Readahead, complete
from netswap.client.pool import PagePool
from netswap.common import loopmetrics
from netswap.common.limits import PAGE_SIZE

log = logging.getLogger(__name__)

T = TypeVar("T")


_ZERO_PAGE = memoryview(bytes(PAGE_SIZE))  # zero-fill source: zeroing allocates nothing


class BatchArea(Protocol):
    """What the device needs of an area (netswap.client.Area provides it)."""

    name: str
    page_size: int
    max_batch_pages: int
    pool: PagePool

    @property
    def size_bytes(self) -> int: ...

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None: ...

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None: ...

    async def discard_batch(self, slots: Sequence[int]) -> None: ...

    async def reattach(self) -> bool: ...

    async def superseded(self) -> bool: ...


class DeviceError(Exception):
    """A request failed; `errno` is the NBD error to answer with."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(eq=False)
class _Request:
    """One caller's operation, possibly split into several parts (and so RPCs).

    It completes -- `done(error)` -- only when every part has finished, also
    when one failed, so the caller never gets its buffer (or range lock) back
    while another part still reads into or writes from it.
    """

    parts: int
    done: Callable[[BaseException | None], None]
    deadline: float  # loop time after which an unreachable server means EIO
    error: BaseException | None = None

    def part_finished(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.parts -= 1
        if self.parts == 0:
            self.done(self.error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if not future.done():  # a caller that was cancelled no longer listens
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


@dataclass
class _Part:
    first: int  # first slot
    count: int  # pages
    view: memoryview | None  # count pages of data (None for discard)
    request: _Request
    alone: bool = False  # sent in a batch of its own (read-ahead: no read waits for it)


@dataclass(eq=False)
class _Held:
    first: int
    end: int
    waiters: list[asyncio.Future[None]] | None = None  # made only when someone waits


class RangeLocks:
    """Exclusive locks on page ranges: overlapping holders run one after another.

    Every NBD request takes one, so finding a conflict must be cheap with
    dozens held: ranges of up to SMALL pages (the usual request) are indexed
    by page; the few longer ones are kept in a list and compared one by one.
    """

    SMALL = 64

    def __init__(self) -> None:
        self._by_page: dict[int, _Held] = {}
        self._large: list[_Held] = []

    def _busy(self, first: int, end: int) -> _Held | None:
        for held in self._large:
            if held.first < end and first < held.end:
                return held
        by_page = self._by_page
        if end - first <= len(by_page):
            for page in range(first, end):
                if (found := by_page.get(page)) is not None:
                    return found
        else:  # a long range against few held pages: look at those instead
            for page, holder in by_page.items():
                if first <= page < end:
                    return holder
        return None

    def try_acquire(self, first: int, count: int) -> _Held | None:
        """The lock on [first, first+count) if nobody holds any of it, else None."""
        end = first + count
        if self._busy(first, end) is not None:
            return None
        held = _Held(first, end)
        if count <= self.SMALL:
            for page in range(first, end):
                self._by_page[page] = held
        else:
            self._large.append(held)
        return held

    async def acquire(self, first: int, count: int) -> _Held:
        while (held := self.try_acquire(first, count)) is None:
            busy = self._busy(first, first + count)
            assert busy is not None
            if busy.waiters is None:
                busy.waiters = []
            wake = asyncio.get_running_loop().create_future()
            busy.waiters.append(wake)
            await wake
        return held

    def release(self, held: _Held) -> None:
        if held.end - held.first <= self.SMALL:
            for page in range(held.first, held.end):
                del self._by_page[page]
        else:
            self._large.remove(held)
        for wake in held.waiters or ():
            if not wake.done():
                wake.set_result(None)


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
        self.retry_deadline = retry_deadline
        self.max_rpcs = max_rpcs
        self._queues: dict[str, deque[_Part]] = {"in": deque(), "out": deque(), "discard": deque()}
        self._next_kind = 0
        self._kick_scheduled = False
        self._holding = False  # see hold()
        self._kick_wanted = False
        self._in_flight = 0
        self._locks = RangeLocks()
        self._ordered = 0  # lock-taking requests called and not yet finished (see write())
        self._reattach_lock = asyncio.Lock()
        self._generation = 0  # bumped by every re-attach
        self.failed: str | None = None
        self.server_up = True  # did the last RPC reach the server?
        # labels() takes a lock and builds a key: each kind's child, looked up once.
        self._on_batch = (
            {k: on_batch.labels(k) for k in ("in", "out", "discard")} if on_batch is not None else None
        )
        self.rpcs: dict[str, int] = {"in": 0, "out": 0, "discard": 0}  # RPCs sent, for stats/tests
        self.retries = 0
        # Windows of at most one batch: each is one SwapIn.
        window = min(readahead_pages, area.max_batch_pages)
        self.readahead = (
            Readahead(
                self.page_size,
                self.size // self.page_size,
                window,
                fetch=lambda first, count, into, done: self._queue("in", first, count, into, done),
                fetch_ahead=lambda first, count, into, done: self._queue(
                    "in", first, count, into, done, alone=True
                ),
                schedule=lambda done: asyncio.get_running_loop().call_soon(done, None),
            )
            if window > 0
            else None
        )

    @property
    def reattaches(self) -> int:
        """Fresh handles obtained since start (one per server restart survived)."""
        return self._generation

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

    # -- operations without a task: the common case ---------------------------------
    #
    # A task per NBD request (its creation, two wake-ups, a future) cost more
    # than everything else the frontend does for a 4 KiB request. Whole-page
    # writes on free pages, and every read, need no awaiting of their own:
    # they are queued with a callback that the batch's RPC calls.

    def start_write(
        self, offset: int, length: int, buf: memoryview, done: Callable[[BaseException | None], None]
    ) -> bool:
        """Start writing whole pages from buf; done(error) runs once the write has finished.

        False, with nothing started, when the write needs write(): it covers
        pages only in part, another request holds some of them or is waiting
        to (see write()), or the device has failed.
        """
        ps = self.page_size
        if offset % ps or length % ps or self.failed or self._ordered:
            return False
        first, count = offset // ps, length // ps
        held = self._locks.try_acquire(first, count)
        if held is None:
            return False

        def finished(error: BaseException | None) -> None:
            self._locks.release(held)
            done(error)

        self._queue("out", first, count, buf[:length], finished)
        return True

    def start_read(
        self, offset: int, length: int, pages: memoryview, done: Callable[[BaseException | None], None]
    ) -> bool:
        """Start filling `pages` (the span's whole pages), as read() does; done(error) runs once
        they are filled. False, with nothing started, if the device has failed."""
        if self.failed:
            return False
        first, count, _ = self.span(offset, length)
        if self.readahead is not None:
            self.readahead.read(first, count, pages, done)
        else:
            self._queue("in", first, count, pages, done)
        return True

    # -- operations ---------------------------------------------------------------

    async def read(self, offset: int, length: int, pages: memoryview) -> None:
        """Fill `pages` (the span's whole pages) from the area."""
        first, count, _ = self.span(offset, length)
        await self._submit("in", first, count, pages)

    # write(), write_zeroes() and trim() take range locks, in tasks of their
    # own. They count from the call -- when the NBD connection parses the
    # request -- not from their task's first step: while any is pending,
    # start_write() refuses, so a whole-page write parsed after, say, a TRIM
    # of its page cannot take the page first; it queues behind in a task.

    def write(self, offset: int, length: int, buf: memoryview) -> Coroutine[Any, Any, None]:
        """Write bytes [offset, offset+length) (await the result).

        `buf` holds span pages followed by partial_edges() scratch pages; the
        payload already sits at buf[skip : skip+length]. Edge bytes outside
        the payload are filled from the area first (read-modify-write).
        """
        return self._in_order(self._write(offset, length, buf))

    def write_zeroes(self, offset: int, length: int, scratch: memoryview) -> Coroutine[Any, Any, None]:
        """Zero bytes [offset, offset+length) (await the result): whole pages are discarded (they
        read as zeros and stay reserved); partial edge pages are read, zeroed in part and written
        back using `scratch` (partial_edges() pages)."""
        return self._in_order(self._write_zeroes(offset, length, scratch))

    def trim(self, offset: int, length: int) -> Coroutine[Any, Any, None]:
        """Discard the whole pages inside the range (await the result); partial pages are left
        as they are (TRIM only says the client no longer cares about the contents)."""
        return self._in_order(self._trim(offset, length))

    def _in_order(self, work: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
        self._ordered += 1
        return self._counted(work)

    async def _counted(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self._ordered -= 1

    async def _write(self, offset: int, length: int, buf: memoryview) -> None:
        ps = self.page_size
        first, count, _ = self.span(offset, length)
        data = buf[: count * ps]
        held = await self._locks.acquire(first, count)
        try:
            scratch = count * ps
            for i, lo, hi in self.edges(offset, length):
                # An edge page keeps its stored bytes outside the payload.
                keep = [r for r in ((0, lo), (hi, ps)) if r[0] < r[1]]
                page = data[i * ps : (i + 1) * ps]
                await self._merge_edge(first + i, page, keep, buf[scratch : scratch + ps])
                scratch += ps
            await self._submit("out", first, count, data)
        finally:
            self._locks.release(held)

    async def _merge_edge(
        self, slot: int, page: memoryview, keep: list[tuple[int, int]], scratch: memoryview
    ) -> None:
        """Copy the `keep` byte ranges of the stored page `slot` into `page` (the rest is new data)."""
        await self._submit("in", slot, 1, scratch)
        for lo, hi in keep:
            page[lo:hi] = scratch[lo:hi]

    async def _write_zeroes(self, offset: int, length: int, scratch: memoryview) -> None:
        ps = self.page_size
        first, count, _ = self.span(offset, length)
        edges = self.edges(offset, length)
        held = await self._locks.acquire(first, count)
        try:
            for n, (i, lo, hi) in enumerate(edges):
                page = scratch[n * ps : (n + 1) * ps]
                await self._submit("in", first + i, 1, page)
                page[lo:hi] = _ZERO_PAGE[: hi - lo]
                await self._submit("out", first + i, 1, page)
            # Whole pages in between: neither the first nor the last if those are edges.
            full_lo = first + (1 if edges and edges[0][0] == 0 else 0)
            full_hi = first + count - (1 if edges and edges[-1][0] == count - 1 else 0)
            if full_hi > full_lo:
                await self._submit("discard", full_lo, full_hi - full_lo, None)
        finally:
            self._locks.release(held)

    async def _trim(self, offset: int, length: int) -> None:
        ps = self.page_size
        lo = -(-offset // ps)
        hi = (offset + length) // ps
        if hi > lo:
            held = await self._locks.acquire(lo, hi - lo)
            try:
                await self._submit("discard", lo, hi - lo, None)
            finally:
                self._locks.release(held)

    # -- coalescing -----------------------------------------------------------------

    async def _submit(self, kind: str, first: int, count: int, view: memoryview | None) -> None:
        if self.failed:
            raise DeviceError(EIO, self.failed)
        future = asyncio.get_running_loop().create_future()
        self._queue(kind, first, count, view, partial(_settle, future))
        await future

    def _queue(
        self,
        kind: str,
        first: int,
        count: int,
        view: memoryview | None,
        done: Callable[[BaseException | None], None],
        *,
        alone: bool = False,
    ) -> None:
        step = self.area.max_batch_pages
        loop = asyncio.get_running_loop()
        request = _Request(-(-count // step), done, loop.time() + self.retry_deadline)
        queue = self._queues[kind]
        if count <= step:
            queue.append(_Part(first, count, view, request, alone))
        else:
            ps = self.page_size
            for start in range(0, count, step):
                n = min(step, count - start)
                part_view = view[start * ps : (start + n) * ps] if view is not None else None
                queue.append(_Part(first + start, n, part_view, request, alone))
        if self._holding:
            self._kick_wanted = True
        elif not self._kick_scheduled:
            # Not now: once the current callback -- which may be parsing many
            # requests out of one socket read -- has queued them all. call_soon
            # is the next turn of the loop, not a timer.
            self._kick_scheduled = True
            loop.call_soon(self._kick)

    def hold(self) -> None:
        """Queue without starting RPCs until release().

        The NBD connection holds while it parses one socket read: all its
        requests are queued, then release() cuts their batches at once -- a
        turn of the event loop sooner than the call_soon a lone request waits
        for (at queue depth 1, one of the few turns a request takes).
        """
        self._holding = True

    def release(self) -> None:
        self._holding = False
        if self._kick_wanted:
            self._kick_wanted = False
            self._kick()

    def _kick(self) -> None:
        """Start RPCs for queued parts while fewer than max_rpcs are in flight."""
        self._kick_scheduled = False
        kinds = ("in", "out", "discard")
        while self._in_flight < self.max_rpcs:
            for i in range(len(kinds)):  # round robin, so no kind starves another
                kind = kinds[(self._next_kind + i) % len(kinds)]
                if self._queues[kind]:
                    self._next_kind = (self._next_kind + i + 1) % len(kinds)
                    break
            else:
                return
            batch = self._cut_batch(self._queues[kind])
            self._in_flight += 1
            task = asyncio.ensure_future(self._run(kind, batch))
            task.add_done_callback(_consume)

    def _cut_batch(self, queue: deque[_Part]) -> list[_Part]:
        """Parts from the head of the queue: up to max_batch_pages pages, no slot twice."""
        room = self.area.max_batch_pages
        head = queue[0]
        if head.count > room:  # the server now allows less than when this was queued
            ps = self.page_size
            rest_view = head.view[room * ps :] if head.view is not None else None
            queue[0] = _Part(head.first + room, head.count - room, rest_view, head.request, head.alone)
            head.request.parts += 1
            return [
                _Part(
                    head.first,
                    room,
                    head.view[: room * ps] if head.view is not None else None,
                    head.request,
                    head.alone,
                )
            ]
        batch: list[_Part] = []
        seen: set[int] = set()  # linear in the batch's pages: pairwise checks were quadratic
        while queue and queue[0].count <= room:
            part = queue[0]
            if batch and (part.alone or batch[0].alone):
                break
            slots = range(part.first, part.first + part.count)
            if not seen.isdisjoint(slots):
                break  # the server refuses a slot twice in one call: next batch
            seen.update(slots)
            batch.append(queue.popleft())
            room -= part.count
        return batch

    async def _run(self, kind: str, batch: list[_Part]) -> None:
        error: BaseException | None = None
        try:
            slots = _slots_of(batch)
            views = [p.view for p in batch if p.view is not None]
            deadline = min(p.request.deadline for p in batch)
            if kind == "out":
                await self._with_retry(lambda: self.area.write_batch(slots, views), deadline)
            elif kind == "in":
                await self._with_retry(lambda: self.area.read_batch(slots, views), deadline)
            else:
                await self._with_retry(lambda: self.area.discard_batch(slots), deadline)
            self.rpcs[kind] += 1
            if self._on_batch is not None:
                self._on_batch[kind].observe(len(slots))
        except DeviceError as e:
            error = e
        except Exception as e:
            error = DeviceError(EIO, str(e))
        except asyncio.CancelledError:
            error = DeviceError(EIO, "the frontend is stopping")
            raise
        finally:
            for part in batch:
                if kind != "in" and self.readahead is not None:
                    # Before the writer hears back: from now on no read may see
                    # what a window holds of these pages (see readahead.py).
                    self.readahead.invalidate(part.first, part.count)
                complete(part.request.part_finished, error)  # a caller's done() runs here
            self._in_flight -= 1
            self._kick()

    # -- resilience -------------------------------------------------------------------

    async def _with_retry(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            if self.failed:
                raise DeviceError(EIO, self.failed)
            generation = self._generation
            try:
                result = await call()
                self.server_up = True
                return result
            except ConnectionLost as e:
                self.server_up = False
                if loop.time() + delay > deadline:
                    raise DeviceError(EIO, f"server unreachable until the retry deadline: {e}") from e
                if self.retries % 20 == 0:
                    log.warning(
                        "server unreachable (%s); retrying for up to %.0fs", e, deadline - loop.time()
                    )
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except AreaNotFound:
                await self._reattach(generation, deadline)
            except InvalidRequest as e:
                raise DeviceError(EINVAL, str(e)) from e
            except NetswapError as e:
                raise DeviceError(EIO, str(e)) from e

    async def _reattach(self, generation: int, deadline: float) -> None:
        """Our handle died: take the area back if the server restarted, give up otherwise.

        Once for all waiting callers. If the server did *not* restart, someone
        else attached the area (or swapped it off): taking it back would start
        a tug of war between two writers on one swap area, so the device fails.
        """
        async with self._reattach_lock:
            if self._generation != generation or self.failed:
                return  # someone else already did (or found the area gone)
            loop = asyncio.get_running_loop()
            delay = 0.05
            while True:
                try:
                    if await self.area.superseded():
                        self._fail(
                            f"area {self.area.name!r} was attached by another client (or swapped off)"
                            " while the server kept running; not taking it back"
                        )
                    created = await self.area.reattach()
                    break
                except ConnectionLost as e:
                    if loop.time() + delay > deadline:
                        raise DeviceError(EIO, f"cannot re-attach {self.area.name!r}: {e}") from e
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                except NetswapError as e:
                    self._fail(f"cannot re-attach area {self.area.name!r}: {e}")
            if created:
                self._fail(
                    f"area {self.area.name!r} was gone when re-attaching (server lost its data?);"
                    " failing every request rather than serving zeros"
                )
            self._generation += 1
            log.warning("re-attached area %r with a fresh handle", self.area.name)

    def _fail(self, why: str) -> NoReturn:
        self.failed = why
        log.error("%s", why)
        raise DeviceError(EIO, why)


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


def _slots_of(batch: list[_Part]) -> Sequence[int]:
    """A batch's slots: a range when its parts follow one another, as a lone request's or
    a sequential stream's do (it goes on the wire as a run: see Area.takes_runs), else a list."""
    first = end = batch[0].first
    for part in batch:
        if part.first != end:
            return [slot for p in batch for slot in range(p.first, p.first + p.count)]
        end += part.count
    return range(first, end)
