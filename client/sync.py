"""A blocking facade over the async client, for callers without an event loop.

It runs the one async implementation on a private loop in a background thread;
every method here just submits the matching coroutine and waits for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Self, TypeVar

from netswap.client import core
from netswap.client.pool import Lease
from netswap.common.loop import new_event_loop

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="netswap-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncLease:
    """A pool lease held by a thread outside the client's loop; release() returns it there."""

    def __init__(self, lease: Lease, loop: _LoopThread) -> None:
        self._lease = lease
        self._loop = loop
        self.view = lease.view

    def release(self) -> None:
        async def give_back() -> None:
            self._lease.release()

        self._loop.run(give_back())  # the pool is only touched from its own loop

    def __enter__(self) -> SyncLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SwapClient:
    """Blocking twin of netswap.client.SwapClient (same methods, same errors)."""

    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        timeout: float = core.DEFAULT_TIMEOUT,
        tls: core.TlsFiles | None = None,
    ) -> None:
        self._loop = _LoopThread()

        async def connect() -> core.SwapClient:
            return await core.SwapClient.connect(target, token, timeout=timeout, tls=tls)

        self._client = self._loop.run(connect())

    def swapon(self, name: str, size_bytes: int, *, pool_pages: int | None = None) -> Area:
        return Area(self._loop.run(self._client.swapon(name, size_bytes, pool_pages=pool_pages)), self._loop)

    def list_areas(self) -> list[core.AreaInfo]:
        return self._loop.run(self._client.list_areas())

    def swapoff(self, name: str) -> None:
        self._loop.run(self._client.swapoff(name))

    def close(self) -> None:
        self._loop.run(self._client.close())
        self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Area:
    """Blocking twin of netswap.client.Area."""

    def __init__(self, area: core.Area, loop: _LoopThread) -> None:
        self._area = area
        self._loop = loop
        self.name = area.name
        self.slot_count = area.slot_count
        self.page_size = area.page_size
        self.max_batch_pages = area.max_batch_pages
        self.created = area.created
        self.size_bytes = area.size_bytes

    def swap_out(self, slots: Sequence[int], pages: Any) -> None:
        self._loop.run(self._area.swap_out(slots, pages))

    def swap_in(self, slots: Sequence[int], into: Any = None) -> SyncLease:
        return SyncLease(self._loop.run(self._area.swap_in(slots, into)), self._loop)

    def discard(self, slots: Sequence[int]) -> None:
        self._loop.run(self._area.discard(slots))

    def swapoff(self) -> None:
        self._loop.run(self._area.swapoff())

    def detach(self) -> None:
        self._area.detach()
