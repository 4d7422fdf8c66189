"""Exclusive locks on page ranges: overlapping holders run one after another."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(eq=False)
class Held:
    first: int
    end: int
    waiters: list[asyncio.Future[None]] | None = None  # made only when someone waits


class RangeLocks:
    """Every NBD request that may wait takes one, so finding a conflict must be cheap with
    dozens held: ranges of up to SMALL pages (the usual request) are indexed by page; the
    few longer ones are kept in a list and compared one by one."""

    SMALL = 64

    def __init__(self) -> None:
        self._by_page: dict[int, Held] = {}
        self._large: list[Held] = []

    def _busy(self, first: int, end: int) -> Held | None:
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

    def try_acquire(self, first: int, count: int) -> Held | None:
        """The lock on [first, first+count) if nobody holds any of it, else None."""
        end = first + count
        if self._busy(first, end) is not None:
            return None
        held = Held(first, end)
        if count <= self.SMALL:
            for page in range(first, end):
                self._by_page[page] = held
        else:
            self._large.append(held)
        return held

    async def acquire(self, first: int, count: int) -> Held:
        while (held := self.try_acquire(first, count)) is None:
            busy = self._busy(first, first + count)
            assert busy is not None
            if busy.waiters is None:
                busy.waiters = []
            wake = asyncio.get_running_loop().create_future()
            busy.waiters.append(wake)
            await wake
        return held

    def release(self, held: Held) -> None:
        if held.end - held.first <= self.SMALL:
            for page in range(held.first, held.end):
                del self._by_page[page]
        else:
            self._large.remove(held)
        for wake in held.waiters or ():
            if not wake.done():
                wake.set_result(None)
