"""Worker threads for store calls that may wait for a disk; each result comes back to the event loop.

concurrent.futures wraps every call in a Future, a work item and a condition
variable, and asyncio.wrap_future adds a second future and a chained
callback: more Python than the 4 KiB pwrite most calls carry. Here a call is
a tuple on a SimpleQueue, and its outcome comes back in one
call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
# (loop, future, fn, args, then): then() runs on the loop once fn is over, waited for or not
_Call = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...], Callable[[], None]
]


class IoThreads:
    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._size = threads
        self._name = name
        self._threads: list[threading.Thread] = []

    def call(self, then: Callable[[], None], fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """fn(*args) in a worker thread: a future of its outcome. then() runs on the loop when the
        thread is done with it, even if nobody waits for the future any more."""
        if not self._threads:  # started at first use: a server without a file store needs none
            for i in range(self._size):
                thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args, then))
        return future

    def _work(self) -> None:
        while (call := self._queue.get()) is not None:
            loop, future, fn, args, then = call
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (fn(*args), None)
            except BaseException as e:  # handed to whoever waits, as an executor does
                outcome = (None, e)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, outcome, then)
            # no reference to the last call's buffers or area while idle
            del call, loop, future, fn, args, then, outcome

    def shutdown(self) -> None:
        """Let the threads end once the calls queued so far are done."""
        for _ in self._threads:
            self._queue.put(None)
        self._threads.clear()


def _settle(
    future: asyncio.Future[Any], outcome: tuple[Any, BaseException | None], then: Callable[[], None]
) -> None:
    then()
    if future.cancelled():
        return
    result, error = outcome
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
