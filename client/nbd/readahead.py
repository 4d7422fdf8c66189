"""Read-ahead for sequential swap-in: the next pages fetched while the kernel still asks for these.

Swap-in is mostly a run of small reads at queue depth one: the kernel faults
a page and reads its cluster (8 pages by default), waits, and faults the next.
Slots are handed out in clusters as pages are evicted, so a process that
touches its memory in order swaps it back in order. Each such read pays a
whole round trip to the server; from a second read that starts where the
last one ended, the device fetches the window after it in one SwapIn while
the kernel is still busy with what it has, and answers the following reads
from memory.

How far ahead is learnt from the reader, as Leap does for remote memory:
each time the reader gets through half of a window and goes on, the next is
twice as long, up to `max_window_pages`, and a new run starts at the size the
last one reached; a window given up mostly unread halves it, down to
`window_pages`, the first. A process sweeping its memory soon gets big
windows -- few round trips for many pages -- while scattered short runs go
back to small ones.

Windows live in one buffer allocated at start (reserve safety: serving a
read never needs fresh memory). Every write, write-zeroes or trim, once the
server has answered it and before its writer hears so, drops the windows it
overlaps -- ready ones and ones whose read is still on its way, since the
server may have read those pages before it wrote them. So a read that
follows a write's reply never sees older data; one sent while the write was
in flight may see either, as NBD allows. Reads that were waiting on a
dropped window go to the server like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]
# (first page, pages, buffer to fill, done) -> queue an ordinary read
Fetch = Callable[[int, int, memoryview, Done], None]


@dataclass(eq=False)
class _Window:
    first: int
    count: int
    slot: int  # which part of the read-ahead buffer it fills
    view: memoryview
    used: int = 0  # when a read last used it (Readahead._clock)
    hits: int = 0  # pages reads took from it
    ready: bool = False  # its data arrived
    dropped: bool = False  # a write overlapped it: its data must never be used
    waiters: list[tuple[int, int, memoryview, Done]] = field(default_factory=list)


class Readahead:
    """At most `windows` windows, each filled by one read: `window_pages` pages first, up to
    `max_window_pages` as a run goes on.

    The device calls invalidate() for every write-like request once the
    server has answered it (see the module docstring).
    """

    def __init__(
        self,
        page_size: int,
        total_pages: int,
        window_pages: int,
        *,
        max_window_pages: int | None = None,
        fetch: Fetch,
        fetch_ahead: Fetch,
        schedule: Callable[[Done], object],
        windows: int = 2,
    ) -> None:
        self.page_size = page_size
        self.total_pages = total_pages
        self.window_pages = window_pages  # a run's first window
        self.max_window_pages = max(window_pages, max_window_pages or window_pages)
        self._size = window_pages  # a new run's first window (learnt: see above)
        self._fetch = fetch  # an ordinary read
        self._fetch_ahead = fetch_ahead  # a window's read: a request of its own, after those queued
        self._schedule = schedule  # runs done(None) on a later turn of the loop
        size = self.max_window_pages * page_size
        buffer = memoryview(bytearray(windows * size))
        for at in range(0, len(buffer), page_size):
            buffer[at] = 0  # touch every page now: serving from it must not fault in fresh memory
        self._slots = [buffer[i * size : (i + 1) * size] for i in range(windows)]
        self._free = list(range(windows))
        self._windows: list[_Window] = []
        self._next = -1  # the page just after the last read: where a sequential reader goes on
        self._clock = 0  # counts reads, to find the window used longest ago
        self.hits = 0  # pages answered from a window
        self.fetched = 0  # pages read ahead
        self.dropped = 0  # pages of windows dropped because a write overlapped them

    def read(self, first: int, count: int, into: memoryview, done: Done) -> None:
        """Answer a read: from a window (now, or once its data arrives), or from the server."""
        sequential = first == self._next
        self._next = first + count
        self._clock += 1
        end = first + count
        for window in self._windows:
            if window.first <= first and end <= window.first + window.count:
                break
        else:
            window = None
        if window is not None:
            window.used = self._clock
            window.hits += count
            if window.ready:
                self.hits += count
                self._copy(window, first, count, into)
                self._schedule(done)
            else:
                window.waiters.append((first, count, into, done))
            self._ahead(first + count)
            return
        # The read itself first: a window queued after it goes in a request of
        # its own (fetch_ahead), so this read does not wait for the window's pages.
        self._fetch(first, count, into, done)
        if sequential:
            self._ahead(first + count)

    def invalidate(self, first: int, count: int) -> None:
        """A write to [first, first+count) was answered: drop every window it overlaps."""
        for window in list(self._windows):
            if window.first < first + count and first < window.first + window.count:
                window.dropped = True
                self._windows.remove(window)
                self.dropped += window.count
                if window.ready:
                    self._free.append(window.slot)
                # else: in flight; its slot comes back when the read returns (_arrived)

    # -- windows ------------------------------------------------------------------

    def _ahead(self, start: int) -> None:
        """Have the window at `start` under way, unless one covering it reaches far enough on."""
        covering = next((w for w in self._windows if w.first <= start < w.first + w.count), None)
        count = self._size  # a new run's
        if covering is not None:
            if covering.first + covering.count - start > max(covering.count, self.window_pages) // 2:
                return
            start = covering.first + covering.count
            if any(w.first == start for w in self._windows):
                return
            count = self._size = min(2 * covering.count, self.max_window_pages)  # it goes on: twice as far
        if start >= self.total_pages or (not self._free and not self._evict(start)):
            return
        count = min(count, self.total_pages - start)
        slot = self._free.pop()
        window = _Window(start, count, slot, self._slots[slot][: count * self.page_size], self._clock)
        self._windows.append(window)
        self.fetched += count
        self._fetch_ahead(start, count, window.view, lambda error: self._arrived(window, error))

    def _evict(self, start: int) -> bool:
        """Free the ready window used longest ago, unless it is the one the reader is in."""
        ready = [w for w in self._windows if w.ready and not w.first <= start - 1 < w.first + w.count]
        if not ready:
            return False
        window = min(ready, key=lambda w: w.used)
        self._windows.remove(window)
        self._free.append(window.slot)
        if window.hits < window.count // 2:  # fetched mostly in vain
            self._size = max(self.window_pages, self._size // 2)
        return True

    def _arrived(self, window: _Window, error: BaseException | None) -> None:
        waiters, window.waiters = window.waiters, []
        if window.dropped:  # a write overlapped it: its data must not be used
            self._free.append(window.slot)
            for first, count, into, done in waiters:
                if error is None:
                    self._fetch(first, count, into, done)  # read them like any other read
                else:  # failed anyway (the server unreachable, the frontend stopping)
                    complete(done, error)
            return
        if error is not None:  # its readers fail as their own reads would have
            self._windows.remove(window)
            self._free.append(window.slot)
            for *_, done in waiters:
                complete(done, error)
            return
        window.ready = True
        for first, count, into, done in waiters:
            self.hits += count
            self._copy(window, first, count, into)
            complete(done, None)

    def _copy(self, window: _Window, first: int, count: int, into: memoryview) -> None:
        ps = self.page_size
        at = (first - window.first) * ps
        into[: count * ps] = window.view[at : at + count * ps]


def complete(done: Done, error: BaseException | None) -> None:
    """done(error), logged if it raises: one caller whose completion fails must not strand
    the others completed after it (here and in the device's batches)."""
    try:
        done(error)
    except Exception:
        log.exception("completing a request failed")
