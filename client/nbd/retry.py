"""Keeping an area reachable: retries while the server is away, re-attaching after it restarts.

A swap device that errors kills processes; one that pauses does not. So a
request whose server is unreachable waits and retries (backoff 50 ms -> 2 s)
until its deadline. A handle the server no longer knows is replaced by
re-attaching the area -- unless the server kept running (someone else took
the area) or lost it (re-attaching had to create it): then every request
fails from then on, never with zeros where swapped-out pages were.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

from netswap.client.errors import AreaNotFound, ConnectionLost, InvalidRequest, NetswapError
from netswap.client.nbd.protocol import EINVAL, EIO

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeviceError(Exception):
    """A request failed; `errno` is the NBD error to answer with."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Reattachable(Protocol):
    name: str

    async def reattach(self) -> bool: ...

    async def superseded(self) -> bool: ...


class Backoff:
    """Waits of 50 ms, doubling up to 2 s, for as long as they end before `deadline` (loop time)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._delay = 0.05

    def expired(self) -> bool:
        """Whether the next try would come after the deadline."""
        return asyncio.get_running_loop().time() + self._delay > self.deadline

    async def wait(self) -> None:
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, 2.0)


class Resilience:
    def __init__(self, area: Reattachable) -> None:
        self.area = area
        self.failed: str | None = None  # why every request fails from now on
        self.server_up = True  # did the last RPC reach the server?
        self.retries = 0
        self.generation = 0  # fresh handles obtained (one per server restart survived)
        self._reattach_lock = asyncio.Lock()

    def check(self) -> None:
        if self.failed:
            raise DeviceError(EIO, self.failed)

    async def call(self, deadline: float, rpc: Callable[..., Awaitable[T]], *args: Any) -> T:
        """rpc(*args), retried until `deadline` while the server is unreachable; NetswapErrors
        become DeviceErrors."""
        backoff: Backoff | None = None  # made at the first failure: most calls have none
        while True:
            self.check()
            generation = self.generation
            try:
                result = await rpc(*args)
            except ConnectionLost as e:
                self.server_up = False
                if backoff is None:
                    backoff = Backoff(deadline)
                if backoff.expired():
                    raise DeviceError(EIO, f"server unreachable until the retry deadline: {e}") from e
                if self.retries % 20 == 0:
                    log.warning(
                        "server unreachable (%s); retrying for up to %.0fs",
                        e, deadline - asyncio.get_running_loop().time(),
                    )  # fmt: skip
                self.retries += 1
                await backoff.wait()
            except AreaNotFound:
                await self._reattach(generation, deadline)
            except InvalidRequest as e:
                raise DeviceError(EINVAL, str(e)) from e
            except NetswapError as e:
                raise DeviceError(EIO, str(e)) from e
            else:
                self.server_up = True
                return result

    async def _reattach(self, generation: int, deadline: float) -> None:
        """Our handle died: take the area back if the server restarted, give up otherwise.

        Once for all waiting callers. If the server did *not* restart, someone
        else attached the area (or swapped it off): taking it back would start
        a tug of war between two writers on one swap area, so the device fails.
        """
        async with self._reattach_lock:
            if self.generation != generation or self.failed:
                return  # someone else already did (or found the area gone)
            backoff = Backoff(deadline)
            name = self.area.name
            while True:
                try:
                    if await self.area.superseded():
                        self._fail(
                            f"area {name!r} was attached by another client (or swapped off)"
                            " while the server kept running; not taking it back"
                        )
                    created = await self.area.reattach()
                    break
                except ConnectionLost as e:
                    if backoff.expired():
                        raise DeviceError(EIO, f"cannot re-attach {name!r}: {e}") from e
                    await backoff.wait()
                except NetswapError as e:
                    self._fail(f"cannot re-attach area {name!r}: {e}")
            if created:
                self._fail(
                    f"area {name!r} was gone when re-attaching (server lost its data?);"
                    " failing every request rather than serving zeros"
                )
            self.generation += 1
            log.warning("re-attached area %r with a fresh handle", name)

    def _fail(self, why: str) -> NoReturn:
        self.failed = why
        log.error("%s", why)
        raise DeviceError(EIO, why)
