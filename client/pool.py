"""PagePool: every page buffer a client will use, allocated once, at swapon.

The pool is one anonymous mapping (page-aligned, faulted in at creation),
handed out as contiguous runs of pages. It never grows: when no run of the
size asked for is free, the caller waits until enough is released
(backpressure), in FIFO order so a large request is not starved by small ones.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import mmap
from collections import deque

from netswap.common.limits import PAGE_SIZE


class Lease:
    """A contiguous run of pool pages; `view` is a memoryview of exactly those pages.

    Give it back with release() (or use `with lease:`); reading `view`
    afterwards is a bug, so it is released with the lease.
    """

    __slots__ = ("_pool", "pages", "start", "view")

    def __init__(self, pool: PagePool | None, start: int, pages: int, view: memoryview) -> None:
        self._pool = pool
        self.start = start
        self.pages = pages
        self.view = view

    def release(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            self.view.release()
            pool._give_back(self.start, self.pages)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PagePool:
    def __init__(self, pages: int, page_size: int = PAGE_SIZE) -> None:
        if pages <= 0:
            raise ValueError("a page pool needs at least one page")
        self.page_size = page_size
        self.capacity = pages
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._mm = mmap.mmap(-1, pages * page_size, flags=flags)
        self._view = memoryview(self._mm)
        # Touch every page so it is resident now, whatever MAP_POPULATE did.
        for off in range(0, pages * page_size, page_size):
            self._view[off] = 0
        # Free runs as sorted, non-adjacent (start, length) pairs.
        self._free: list[tuple[int, int]] = [(0, pages)]
        self._free_pages = pages
        self._waiters: deque[tuple[int, asyncio.Future[Lease]]] = deque()
        self._closing = False

    @property
    def free_pages(self) -> int:
        return self._free_pages

    @property
    def nbytes(self) -> int:
        return self.capacity * self.page_size

    def try_acquire(self, pages: int) -> Lease | None:
        """A lease of `pages` contiguous pages now, or None if no such run is free."""
        if self._closing or not 0 < pages <= self.capacity:
            self._check(pages)  # raises
        if self._waiters:  # FIFO: do not overtake someone already waiting
            return None
        return self._take(pages)

    async def acquire(self, pages: int) -> Lease:
        """A lease of `pages` contiguous pages, waiting until they are free."""
        self._check(pages)
        if not self._waiters:
            lease = self._take(pages)
            if lease is not None:
                return lease
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._waiters.append((pages, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                fut.result().release()  # granted just as we were cancelled
            else:
                # _wake may already have dropped our cancelled future.
                with contextlib.suppress(ValueError):
                    self._waiters.remove((pages, fut))
                self._wake()
            raise

    def _check(self, pages: int) -> None:
        if self._closing:
            raise ValueError("the page pool is closed")
        if not 0 < pages <= self.capacity:
            raise ValueError(f"cannot lease {pages} pages from a pool of {self.capacity}")

    def _take(self, pages: int) -> Lease | None:
        for i, (start, length) in enumerate(self._free):  # first fit
            if length >= pages:
                if length == pages:
                    del self._free[i]
                else:
                    self._free[i] = (start + pages, length - pages)
                self._free_pages -= pages
                ps = self.page_size
                return Lease(self, start, pages, self._view[start * ps : (start + pages) * ps])
        return None

    def _give_back(self, start: int, pages: int) -> None:
        self._free_pages += pages
        end = start + pages
        i = bisect.bisect(self._free, (start, pages))
        # Merge with the neighbours so the pool does not fragment for good.
        if i < len(self._free) and self._free[i][0] == end:
            nxt_start, nxt_len = self._free.pop(i)
            end = nxt_start + nxt_len
        if i > 0 and sum(self._free[i - 1]) == start:
            start = self._free[i - 1][0]
            self._free[i - 1] = (start, end - start)
        else:
            self._free.insert(i, (start, end - start))
        if self._closing:
            self._unmap_if_idle()
        elif self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            pages, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            lease = self._take(pages)
            if lease is None:
                return
            self._waiters.popleft()
            fut.set_result(lease)

    def close(self) -> None:
        """Refuse new leases; unmap once every outstanding lease is back (now, if none is out)."""
        self._closing = True
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(ValueError("the page pool is closed"))
        self._waiters.clear()
        self._unmap_if_idle()

    def _unmap_if_idle(self) -> None:
        if self._free_pages == self.capacity and not self._mm.closed:
            self._view.release()
            # If a slice of some returned lease is still referenced (a finished
            # request's closure not yet collected) the mapping cannot close
            # now. Every page is back and no lease is handed out any more, so
            # nothing can use it: it goes when the last of those views does.
            with contextlib.suppress(BufferError):
                self._mm.close()
