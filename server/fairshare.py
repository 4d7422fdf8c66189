"""The event loop's time, shared fairly between principals.

Every request is executed on the one event loop, and asyncio runs whatever
is ready in arrival order: a tenant with many streams of big batches would
have dozens of them ahead of anyone else's request. So each principal's use
of the loop is tracked (an exponentially decaying sum, time constant TAU).
While the loop is busy and a principal has used more than its share (the
busy time over the active principals, with some slack), its requests do not
run when they arrive: they queue, and a dispatcher runs the queued ones one
at a time, round robin between principals, one per turn of the event loop --
so everyone else's requests, which run at once, pass them.

A principal alone on the server, or within its share, never waits here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

TAU = 0.1  # seconds of history that count
BUSY = 0.5  # the loop counts as busy above this share of TAU
SLACK = 1.5  # a principal is over its share past this multiple of it
ACTIVE = 0.005  # a principal with less than this share of TAU counts as idle


class _Usage:
    __slots__ = ("at", "seconds")

    def __init__(self, now: float) -> None:
        self.seconds = 0.0
        self.at = now


class FairShare:
    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._total = _Usage(time.monotonic())
        self._active = 1
        self._counted_at = 0.0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._order: deque[str] = deque()  # principals with queued requests, round robin
        self._dispatching = False
        self.deferred = 0  # requests that waited for their turn (a metric)

    def turn(self, principal: str) -> asyncio.Future[None] | None:
        """None: run now. Else a future to await: the principal's turn; call done() after."""
        now = time.monotonic()
        total = _decayed(self._total, now)
        if total < BUSY * TAU:
            return None
        usage = self._usage.get(principal)
        if usage is None or _decayed(usage, now) * self._count_active(now) <= SLACK * total:
            return None
        wait: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(principal)
        if queue is None:
            queue = self._queues[principal] = deque()
            self._order.append(principal)
        queue.append(wait)
        self.deferred += 1
        if not self._dispatching:
            self._dispatching = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        return wait

    def used(self, principal: str, seconds: float, waited: bool) -> None:
        """Account `seconds` of loop time to `principal`; `waited`: it came through turn()."""
        now = time.monotonic()
        usage = self._usage.get(principal)
        if usage is None:
            usage = self._usage[principal] = _Usage(now)
        usage.seconds = _decayed(usage, now) + seconds
        usage.at = now
        self._total.seconds = _decayed(self._total, now) + seconds
        self._total.at = now
        if waited:  # the dispatcher waits for each queued request to finish: the next one may go
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Wake the next queued request (round robin by principal); it calls used() when done."""
        while self._order:
            principal = self._order.popleft()
            queue = self._queues[principal]
            wait = queue.popleft()
            if queue:
                self._order.append(principal)
            else:
                del self._queues[principal]
            if not wait.cancelled():  # a caller that left has no turn to take
                wait.set_result(None)
                return
        self._dispatching = False

    def _count_active(self, now: float) -> int:
        if now - self._counted_at > TAU / 10:  # a scan of every principal, at most ten times per TAU
            self._counted_at = now
            floor = ACTIVE * TAU
            stale = [p for p, u in self._usage.items() if _decayed(u, now) < floor / 100]
            for p in stale:
                del self._usage[p]
            self._active = max(1, sum(1 for u in self._usage.values() if _decayed(u, now) >= floor))
        return self._active


def _decayed(usage: _Usage, now: float) -> float:
    return usage.seconds * math.exp((usage.at - now) / TAU)
