"""Coalescing: NBD requests queue as *parts* (slot ranges with their buffers), and server requests
are cut from the queue in batches of up to max_batch_pages pages.

Whenever fewer than `max_rpcs` server requests are in flight, the queue of
one kind (read, write, discard; round robin between kinds) is cut into a
batch -- one SwapIn / SwapOut / Discard on the client's PageStream. Requests
that arrive together, or while the server is busy, share a batch; nothing
waits on a timer. An NBD request split over several batches completes, and
gives its buffer back, only when all of them have.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from netswap.client.nbd.protocol import EIO
from netswap.client.nbd.readahead import complete
from netswap.client.nbd.retry import DeviceError, Reattachable, Resilience
from netswap.client.pool import PagePool
from netswap.common import loopmetrics

Done = Callable[[BaseException | None], None]


class Kind(enum.Enum):
    """What a batch asks of the server (the values label metrics)."""

    READ = "in"
    WRITE = "out"
    DISCARD = "discard"

    # Members are singletons: identity hashes at C speed (Enum's own hashes the name in Python).
    __hash__ = object.__hash__


# The members as module constants for the hot path: before Python 3.12 every
# attribute of an Enum class goes through EnumType's __getattr__ hook, slowly.
READ, WRITE, DISCARD = Kind.READ, Kind.WRITE, Kind.DISCARD


class BatchArea(Reattachable, Protocol):
    """What the device needs of an area (netswap.client.Area provides it)."""

    page_size: int
    max_batch_pages: int
    pool: PagePool

    @property
    def size_bytes(self) -> int: ...

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None: ...

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None: ...

    async def discard_batch(self, slots: Sequence[int]) -> None: ...


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's operation, possibly split into several parts (and so RPCs).

    It completes -- `done(error)` -- only when every part has finished, also
    when one failed, so the caller never gets its buffer (or range lock) back
    while another part still reads into or writes from it.
    """

    parts: int
    done: Done
    deadline: float  # loop time after which an unreachable server means EIO
    error: BaseException | None = None

    def part_finished(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.parts -= 1
        if self.parts == 0:
            self.done(self.error)


@dataclass(eq=False, slots=True)
class _Part:
    first: int  # first slot
    count: int  # pages
    view: memoryview | None  # count pages of data (None for discard)
    request: _Request
    alone: bool = False  # sent in a batch of its own (read-ahead: no read waits for it)


class Batcher:
    def __init__(
        self,
        area: BatchArea,
        link: Resilience,
        *,
        retry_deadline: float,
        max_rpcs: int,
        on_batch: loopmetrics.Histogram | None = None,
        on_written: Callable[[int, int], None] | None = None,
    ) -> None:
        self.area = area
        self._link = link
        self.retry_deadline = retry_deadline
        self.max_rpcs = max_rpcs
        self._on_written = on_written  # (first, count) of every write-like batch the server answered
        self._queues: dict[Kind, deque[_Part]] = {kind: deque() for kind in Kind}
        self._kinds = tuple(Kind)
        self._next_kind = 0
        self._kick_scheduled = False
        self._holding = False  # see hold()
        self._kick_wanted = False
        self._in_flight = 0
        self._queued = 0  # parts in all queues
        # labels() takes a lock and builds a key: each kind's series, looked up once.
        self._on_batch = {k: on_batch.labels(k.value) for k in Kind} if on_batch is not None else None
        self.rpcs: dict[str, int] = {kind.value: 0 for kind in Kind}  # RPCs sent, for metrics and tests
        self._labels = {kind: kind.value for kind in Kind}

    def queue(
        self, kind: Kind, first: int, count: int, view: memoryview | None, done: Done, *, alone: bool = False
    ) -> None:
        """Queue `count` pages from `first`; done(error) once the server has answered all of them."""
        step = self.area.max_batch_pages
        loop = asyncio.get_running_loop()
        request = _Request(-(-count // step), done, loop.time() + self.retry_deadline)
        queue = self._queues[kind]
        if count <= step:
            queue.append(_Part(first, count, view, request, alone))
            self._queued += 1
        else:
            ps = self.area.page_size
            for start in range(0, count, step):
                n = min(step, count - start)
                part_view = view[start * ps : (start + n) * ps] if view is not None else None
                queue.append(_Part(first + start, n, part_view, request, alone))
                self._queued += 1
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
        kinds = self._kinds
        while self._queued and self._in_flight < self.max_rpcs:
            for i in range(len(kinds)):  # round robin, so no kind starves another
                kind = kinds[(self._next_kind + i) % len(kinds)]
                if self._queues[kind]:
                    self._next_kind = (self._next_kind + i + 1) % len(kinds)
                    break
            batch = self._cut(self._queues[kind])
            self._in_flight += 1
            # _run fails its parts itself, whatever happens: nobody awaits the task.
            asyncio.get_running_loop().create_task(self._run(kind, batch))

    def _cut(self, queue: deque[_Part]) -> list[_Part]:
        """Parts from the head of the queue: up to max_batch_pages pages, no slot twice."""
        room = self.area.max_batch_pages
        head = queue[0]
        if head.count > room:  # the server now allows less than when this was queued
            ps = self.area.page_size
            rest_view = head.view[room * ps :] if head.view is not None else None
            queue[0] = _Part(head.first + room, head.count - room, rest_view, head.request, head.alone)
            head.request.parts += 1
            first_view = head.view[: room * ps] if head.view is not None else None
            # the rest stays queued in the head's place: as many parts as before
            return [_Part(head.first, room, first_view, head.request, head.alone)]
        if len(queue) == 1:  # a lone request, as at queue depth 1
            self._queued -= 1
            return [queue.popleft()]
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
        self._queued -= len(batch)
        return batch

    async def _run(self, kind: Kind, batch: list[_Part]) -> None:
        error: BaseException | None = None
        try:
            slots, views, deadline = _shape(batch)
            area = self.area
            if kind is WRITE:
                await self._link.call(deadline, area.write_batch, slots, views)
            elif kind is READ:
                await self._link.call(deadline, area.read_batch, slots, views)
            else:
                await self._link.call(deadline, area.discard_batch, slots)
            self.rpcs[self._labels[kind]] += 1
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
            written = self._on_written if kind is not READ else None
            for part in batch:
                if written is not None:
                    # Before the writer hears back: see readahead.py.
                    written(part.first, part.count)
                complete(part.request.part_finished, error)  # a caller's done() runs here
            self._in_flight -= 1
            if self._queued:
                self._kick()


def _shape(batch: list[_Part]) -> tuple[Sequence[int], list[memoryview], float]:
    """A batch's slots, its buffers in slot order and its deadline (the earliest of its parts')."""
    if len(batch) == 1:  # a lone request, as at queue depth 1
        head = batch[0]
        views = [head.view] if head.view is not None else []
        return range(head.first, head.first + head.count), views, head.request.deadline
    views = [p.view for p in batch if p.view is not None]
    return _slots_of(batch), views, min([p.request.deadline for p in batch])


def _slots_of(batch: list[_Part]) -> Sequence[int]:
    """A batch's slots: a range when its parts follow one another, as a lone request's or
    a sequential stream's do (it goes on the wire as a run: see Area.takes_runs), else a list."""
    first = end = batch[0].first
    for part in batch:
        if part.first != end:
            return [slot for p in batch for slot in range(p.first, p.first + p.count)]
        end += part.count
    return range(first, end)
