"""The async client: SwapClient (a connection) and Area (one attached swap area).

Slots map to requests in batches of at most max_batch_pages, sent as messages
on the connection's PageStream (pagestream.py) -- a message on an open stream
costs a fraction of a unary call. Pages go out from the caller's buffer and
come back into the caller's buffer or the area's PagePool; nothing on the
data path allocates page-sized memory of its own except what gRPC itself
does per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc

from netswap.client.errors import AreaNotFound, InvalidRequest, ServerError, error_from_rpc
from netswap.client.pagestream import PageStream
from netswap.client.pool import Lease, PagePool
from netswap.common import samepages
from netswap.common.limits import max_message_bytes
from netswap.common.pagewire import encode_page_discard, encode_page_swap_in, encode_page_swap_out
from netswap.v1 import swap_pb2, swap_pb2_grpc

T = TypeVar("T")

# Largest batch any server will offer; sizes the channel's message limit
# before we know the server's actual max_batch_pages.
MAX_BATCH_LIMIT = 4096
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS channel: the CA that signed the server's certificate and,
    for mutual TLS, this client's certificate and key."""

    ca: Path | None = None  # None: the system's trust store
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise InvalidRequest("a client certificate and its key go together (--tls-cert, --tls-key)")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


@dataclass(frozen=True)
class AreaInfo:
    name: str
    size_bytes: int
    pages_stored: int


@dataclass(frozen=True)
class Listing:
    areas: list[AreaInfo]
    server_id: bytes
    principal: str  # "" from a server that does not say


class SwapClient:
    """A connection to a netswap server, authenticated with a bearer token."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch_pages: int = MAX_BATCH_LIMIT,
        same_pages: bool = True,
    ):
        self._channel = channel
        # No token: the client certificate alone says who we are (mutual TLS).
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        # Batches are cut to what this channel's message limit carries, even
        # if the server would take more.
        self.max_batch_pages = max_batch_pages
        # Same-filled pages travel as their words where the server takes them (swap.proto).
        self.same_pages = same_pages
        self._stub = swap_pb2_grpc.SwapServiceStub(channel)
        self._pages = PageStream(channel, self._metadata, timeout)

    @property
    def timeout(self) -> float:
        """Seconds any one call or page request may take."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = self._pages.timeout = seconds

    @classmethod
    async def connect(
        cls,
        target: str,
        token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        options: Sequence[tuple[str, Any]] = (),
        max_batch_pages: int = MAX_BATCH_LIMIT,
        max_rpcs: int | None = None,
        tls: TlsFiles | None = None,
        same_pages: bool = True,
    ) -> SwapClient:
        """Open a channel to `target` ("HOST:PORT" or "unix:PATH"), over TLS if `tls` is given.

        Messages are capped at what batches of `max_batch_pages` need. With
        `max_rpcs` (the most requests the caller keeps in flight -- on one
        PageStream, so one stream's window), gRPC's flow control is pinned to
        that much too: no bandwidth-delay probing that
        grows receive windows -- and the buffers behind them -- with traffic.
        """
        limit = max_message_bytes(max_batch_pages)
        bounded: list[tuple[str, Any]] = []
        if max_rpcs is not None:
            bounded = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", limit * max_rpcs)]
        channel_options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            *bounded,
            *options,
        ]
        if tls is None:
            channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            channel = grpc.aio.secure_channel(target, tls.credentials(), options=channel_options)
        return cls(channel, token, timeout=timeout, max_batch_pages=max_batch_pages, same_pages=same_pages)

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None = None
    ) -> T:
        """Invoke one RPC with credentials and deadline (the client's unless given); gRPC errors
        become NetswapErrors."""
        try:
            return await method(request, metadata=self._metadata, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None

    async def swapon(
        self, name: str, size_bytes: int, *, pool_pages: int | None = None, timeout: float | None = None
    ) -> Area:
        """Attach (creating if needed) the area `name`; allocate its page pool now.

        pool_pages defaults to two batches' worth (max_batch_pages * 2).
        """
        request = swap_pb2.SwapOnRequest(name=name, size_bytes=size_bytes)
        reply = await self._call(self._stub.SwapOn, request, timeout)
        pool = PagePool(pool_pages or reply.max_batch_pages * 2, reply.page_size)
        return Area(
            self,
            name,
            handle=reply.handle,
            slot_count=reply.slot_count,
            page_size=reply.page_size,
            max_batch_pages=min(reply.max_batch_pages, self.max_batch_pages),
            created=reply.created,
            pool=pool,
            server_id=reply.server_id,
            takes_runs=reply.takes_runs,
            takes_same_pages=reply.takes_same_pages and self.same_pages,
        )

    async def list_areas(self, timeout: float | None = None) -> list[AreaInfo]:
        return (await self.listing(timeout)).areas

    async def server_id(self) -> bytes:
        """The server's per-start identity (changes when the server restarts)."""
        return (await self.listing()).server_id

    async def listing(self, timeout: float | None = None) -> Listing:
        """The caller's areas on this server, the server's identity and the caller's principal."""
        reply = await self._call(self._stub.ListAreas, swap_pb2.ListAreasRequest(), timeout)
        areas = [AreaInfo(a.name, a.size_bytes, a.pages_stored) for a in reply.areas]
        return Listing(areas, reply.server_id, reply.principal)

    async def swapoff(self, name: str) -> None:
        """Destroy the area `name` without holding its handle (re-attaches to get one)."""
        for info in await self.list_areas():
            if info.name == name:
                reply = await self._call(
                    self._stub.SwapOn, swap_pb2.SwapOnRequest(name=name, size_bytes=info.size_bytes)
                )
                await self._call(self._stub.SwapOff, swap_pb2.SwapOffRequest(handle=reply.handle))
                return
        raise AreaNotFound(f"no area named {name!r} (NOT_FOUND)")

    async def close(self) -> None:
        await self._pages.close()
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class PageArea:
    """What every kind of area offers on top of its three one-request operations
    (write_batch, read_batch, discard_batch): any number of slots, split into batches."""

    name: str
    slot_count: int
    page_size: int
    max_batch_pages: int
    pool: PagePool
    created: bool  # made by the SwapOn that attached it (empty), not found there
    # Batches of one call in flight at once: enough to keep the pipe full,
    # few enough that one caller cannot monopolise the connection.
    parallel = 4

    @property
    def size_bytes(self) -> int:
        return self.slot_count * self.page_size

    def _pages_for(self, slots: Sequence[int], buf: memoryview, what: str) -> None:
        if len(buf) != len(slots) * self.page_size:
            raise InvalidRequest(
                f"{what} is {len(buf)} bytes; {len(slots)} slots need {len(slots) * self.page_size}"
            )

    async def _batches(self, n: int, one: Callable[[int, int], Awaitable[None]]) -> None:
        """Run one(start, end) for each batch of slots [start, end), a few at a time."""
        step = self.max_batch_pages
        if n <= step:
            await one(0, n)
            return
        gate = asyncio.Semaphore(self.parallel)

        async def gated(start: int) -> None:
            async with gate:
                await one(start, min(start + step, n))

        tasks = [asyncio.ensure_future(gated(s)) for s in range(0, n, step)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # Stop the other batches before the caller gets its buffer back:
            # none may keep reading from or writing into it after we raise.
            # (Batches already sent may have been applied: a failed call is
            # not atomic.)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def swap_out(self, slots: Sequence[int], pages: Any) -> None:
        """Write pages (a buffer of len(slots) * page_size bytes) to slots."""
        view = memoryview(pages).cast("B")
        self._pages_for(slots, view, "pages")
        if len(slots) <= self.max_batch_pages:  # one request, as most are
            await self.write_batch(slots, [view])
            return
        ps = self.page_size

        async def one(start: int, end: int) -> None:
            await self.write_batch(slots[start:end], [view[start * ps : end * ps]])

        await self._batches(len(slots), one)

    async def swap_in(self, slots: Sequence[int], into: Any = None) -> Lease:
        """Read slots into `into` (a writable buffer) or, if None, into pages leased from the pool.

        Returns a Lease whose .view holds the pages in slot order; release() it
        (or use `with`) to return pool pages. For a caller buffer, release() is a no-op.
        """
        if into is None:
            if len(slots) > self.pool.capacity:
                raise InvalidRequest(
                    f"{len(slots)} slots exceed the page pool ({self.pool.capacity} pages);"
                    " pass a buffer as `into`"
                )
            lease = await self.pool.acquire(len(slots))
        else:
            lease = Lease(None, 0, len(slots), memoryview(into).cast("B"))
        view = lease.view
        try:
            self._pages_for(slots, view, "into")
            if len(slots) <= self.max_batch_pages:  # one request, as most are
                await self.read_batch(slots, [view])
            else:
                ps = self.page_size

                async def one(start: int, end: int) -> None:
                    await self.read_batch(slots[start:end], [view[start * ps : end * ps]])

                await self._batches(len(slots), one)
        except BaseException:
            lease.release()
            raise
        return lease

    async def discard(self, slots: Sequence[int]) -> None:
        """Forget slots: they read as zeros, and stay reserved."""

        async def one(start: int, end: int) -> None:
            await self.discard_batch(slots[start:end])

        await self._batches(len(slots), one)

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        raise NotImplementedError

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        raise NotImplementedError

    async def discard_batch(self, slots: Sequence[int]) -> None:
        raise NotImplementedError

    async def reattach(self) -> bool:
        """Take the area back after its handle died; True if it had to be made anew (empty)."""
        raise NotImplementedError

    async def superseded(self) -> bool:
        """Whether someone else took the area over while its server kept running."""
        raise NotImplementedError

    def detach(self) -> None:
        """Free what this process holds for the area, leaving the area on its server(s)."""
        raise NotImplementedError

    async def swapoff(self) -> None:
        """Destroy the area and free what this process holds for it."""
        raise NotImplementedError


class Area(PageArea):
    """One attached area. Slots are 0..slot_count-1; each holds one page of page_size bytes."""

    def __init__(
        self,
        client: SwapClient,
        name: str,
        *,
        handle: bytes,
        slot_count: int,
        page_size: int,
        max_batch_pages: int,
        created: bool,
        pool: PagePool,
        server_id: bytes = b"",
        takes_runs: bool = False,
        takes_same_pages: bool = False,
    ) -> None:
        self._client = client
        self._handle = handle
        self.name = name
        self.slot_count = slot_count
        self.page_size = page_size
        self.max_batch_pages = max_batch_pages
        self.created = created
        self.pool = pool
        self.server_id = server_id  # the server start this handle belongs to
        # The server takes a run of slots as two numbers (swap.proto): slots
        # given as a range go that way.
        self.takes_runs = takes_runs
        # It takes same-filled pages as their words, and sends them so (swap.proto).
        self.takes_same_pages = takes_same_pages

    # -- one request each: at most max_batch_pages slots, pages scattered/gathered --

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        """One SwapOut: the pages of `slots` are the concatenation of `pages` (no copy to join them)."""
        same = None
        if self.takes_same_pages:  # same-filled pages go as their words
            pages, same = samepages.find(pages, self.page_size)
        await self._client._pages.request(
            encode_page_swap_out(self._handle, slots, pages, self.takes_runs, same)
        )

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        """One SwapIn: the pages of `slots`, in order, fill the buffers of `into` one after another."""
        request = encode_page_swap_in(self._handle, slots, self.takes_runs, self.takes_same_pages)
        got, same = await self._client._pages.request(request)
        words = len(same) if same is not None else 0
        if (
            len(got) != (len(slots) - words) * self.page_size
            or len(slots) * self.page_size != sum(map(len, into))
            or (same is not None and same.index[-1] >= len(slots))
        ):
            raise ServerError(
                f"server returned {len(got)} bytes and {words} same pages for {len(slots)} pages"
            )
        if same is None and len(into) == 1:
            into[0][:] = got
        else:
            samepages.fill(into, got, same, self.page_size)

    async def discard_batch(self, slots: Sequence[int]) -> None:
        """One Discard."""
        await self._client._pages.request(encode_page_discard(self._handle, slots, self.takes_runs))

    async def reattach(self, timeout: float | None = None) -> bool:
        """SwapOn again with the same name and size for a fresh handle (e.g. after a server restart).

        Returns `created`: True means the area did not exist any more and an
        empty one was made in its place -- everything stored before is gone.
        """
        request = swap_pb2.SwapOnRequest(name=self.name, size_bytes=self.size_bytes)
        reply = await self._client._call(self._client._stub.SwapOn, request, timeout)
        self._handle = reply.handle
        self.server_id = reply.server_id
        # The server that restarted may be another version.
        self.takes_runs = reply.takes_runs
        self.takes_same_pages = reply.takes_same_pages and self._client.same_pages
        # The restarted server may allow another size.
        self.max_batch_pages = min(reply.max_batch_pages, self._client.max_batch_pages)
        return reply.created

    async def superseded(self) -> bool:
        """True if our handle died while the server kept running (another client attached
        the area, or it was swapped off): re-attaching would just take it back."""
        return await self._client.server_id() == self.server_id

    async def swapoff(self) -> None:
        """Destroy the area on the server and free the page pool."""
        await self._client._call(self._client._stub.SwapOff, swap_pb2.SwapOffRequest(handle=self._handle))
        self.pool.close()

    def detach(self) -> None:
        """Free the page pool, leaving the area (and its data) on the server."""
        self.pool.close()
