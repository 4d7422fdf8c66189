"""The event loop's time, shared fairly between principals.

Every request is executed on the one event loop, and asyncio runs whatever
is ready in arrival order: a tenant with many streams of big batches would
have dozens of them ahead of anyone else's request. So each principal's use
of the loop is counted over the last two windows of WINDOW seconds. While the
loop is busy and a principal has used more than its share (the busy time
over the active principals, with some slack), its requests do not run when
they arrive: they queue, and a dispatcher runs the queued ones one at a
time, round robin between principals, one per turn of the event loop -- so
everyone else's requests, which run at once, pass them.

A principal alone on the server, or within its share, never waits here.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque

WINDOW = 0.05  # seconds: use is counted over this window and the one before it
BUSY = 0.5  # the loop counts as busy above this share of the time counted
SLACK = 1.5  # a principal is over its share past this multiple of it
ACTIVE = 0.002  # a principal that used less than this share of the time counted is idle


class FairShare:
    def __init__(self) -> None:
        self._started = time.monotonic()  # when the current window began
        self._now: dict[str, float] = {}  # seconds of loop time used in this window...
        self._before: dict[str, float] = {}  # ...and in the one before
        self._now_total = 0.0
        self._before_total = 0.0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._order: deque[str] = deque()  # principals with queued requests, round robin
        self._dispatching = False
        self.deferred = 0  # requests that waited for their turn (a metric)

    def turn(self, principal: str) -> asyncio.Future[None] | None:
        """None: run now. Else a future to await: the principal's turn; call used() after."""
        now = time.monotonic()
        elapsed = now - self._started
        if elapsed >= WINDOW:
            self._roll(elapsed)
            elapsed = now - self._started
        total = self._now_total + self._before_total
        span = elapsed + (WINDOW if self._before_total else 0.0)
        if total < BUSY * span:
            return None
        if self._over(principal, total):
            return self._queue(principal)
        return None

    def used(self, principal: str, seconds: float, waited: bool) -> None:
        """Count `seconds` of loop time to `principal`; `waited`: it came through turn() and has
        not passed the turn on yet."""
        self._now[principal] = self._now.get(principal, 0.0) + seconds
        self._now_total += seconds
        if waited:
            self.pass_turn()

    def pass_turn(self) -> None:
        """The request whose turn it was is done with the loop: the next queued one may go."""
        asyncio.get_running_loop().call_soon(self._dispatch)

    def _roll(self, elapsed: float) -> None:
        if elapsed >= 2 * WINDOW:  # nothing for a whole window: the one before is empty too
            self._before, self._before_total = {}, 0.0
        else:
            self._before, self._before_total = self._now, self._now_total
        self._now, self._now_total = {}, 0.0
        self._started = time.monotonic()

    def _over(self, principal: str, total: float) -> bool:
        mine = self._now.get(principal, 0.0) + self._before.get(principal, 0.0)
        floor = ACTIVE * total
        active = sum(
            1
            for p in self._now.keys() | self._before.keys()
            if self._now.get(p, 0.0) + self._before.get(p, 0.0) >= floor
        )
        return mine * max(active, 1) > SLACK * total

    def _queue(self, principal: str) -> asyncio.Future[None]:
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


class Turn:
    """One request's time on the loop: what it spends awaiting work done elsewhere (I/O
    threads) is not the loop's, and a request that waited for its turn passes it on then."""

    __slots__ = ("_fair", "_principal", "_start", "_used", "_waited")

    def __init__(self, fair: FairShare, principal: str, waited: bool) -> None:
        self._fair = fair
        self._principal = principal
        self._waited = waited
        self._used = 0.0
        self._start = time.perf_counter()

    def pause(self) -> None:
        """Before awaiting what other threads do."""
        self._used += time.perf_counter() - self._start
        if self._waited:
            self._waited = False
            self._fair.pass_turn()

    def resume(self) -> None:
        self._start = time.perf_counter()

    def end(self) -> None:
        self._fair.used(self._principal, self._used + time.perf_counter() - self._start, self._waited)


# The turn of the request being executed, in its own task (AreaManager pauses it).
current_turn: contextvars.ContextVar[Turn | None] = contextvars.ContextVar("netswap_turn", default=None)
