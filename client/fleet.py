"""Several servers as one pool: areas placed by rendezvous hashing, mirrored on `replicas` of them.

With one server this is a SwapClient and nothing more. With several, an
area's copies go to the first servers in placement order (placement.py) that
take it -- a server that has no room or does not answer is skipped -- and
servers that already hold the area come first, so a client that restarts
finds its copies with no metadata service. One copy is an ordinary Area;
more are a MirroredArea (mirror.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from netswap.client.core import Area, Listing, PageArea, SwapClient
from netswap.client.errors import (
    AreaNotFound,
    ConnectionLost,
    InvalidRequest,
    NetswapError,
    NoSpace,
    SizeMismatch,
)
from netswap.client.mirror import MirroredArea, MirrorOptions, Replica, State
from netswap.client.placement import parse_servers, ranked
from netswap.client.srv import SrvError, resolve

CONTROL_TIMEOUT = 10.0  # seconds for listing and attaching on one server


@dataclass(frozen=True)
class Copy:
    server: str
    state: str  # "stored" (the server has it), "unreachable"
    pages_stored: int


@dataclass(frozen=True)
class FleetArea:
    name: str
    size_bytes: int
    copies: list[Copy]

    @property
    def pages_stored(self) -> int:
        return max((c.pages_stored for c in self.copies), default=0)


class Fleet:
    def __init__(self, clients: dict[str, SwapClient]) -> None:
        self.clients = clients  # server -> its client, in the order given
        self.servers = list(clients)

    @classmethod
    async def connect(
        cls,
        spec: str,
        token: str | None,
        *,
        dns_server: str | None = None,
        **connect: Any,
    ) -> Fleet:
        """Clients for `spec` (see placement.parse_servers); `connect` goes to SwapClient.connect."""
        parsed = parse_servers(spec)
        if isinstance(parsed, str):
            try:
                servers = [t.address for t in await resolve(parsed, dns_server)]
            except SrvError as e:
                raise ConnectionLost(f"cannot find the servers of {parsed}: {e}") from e
        else:
            servers = parsed
        clients = {s: await SwapClient.connect(s, token, **connect) for s in servers}
        return cls(clients)

    @property
    def single(self) -> SwapClient | None:
        """The one client, when there is one server."""
        return self.clients[self.servers[0]] if len(self.servers) == 1 else None

    async def listings(self) -> dict[str, Listing | NetswapError]:
        """Every server's ListAreas, or why it could not be had."""

        async def one(client: SwapClient) -> Listing | NetswapError:
            try:
                return await client.listing(timeout=CONTROL_TIMEOUT)
            except NetswapError as e:
                return e

        got = await asyncio.gather(*(one(c) for c in self.clients.values()))
        return dict(zip(self.servers, got, strict=True))

    async def swapon(
        self,
        name: str,
        size_bytes: int,
        *,
        replicas: int = 1,
        pool_pages: int | None = None,
        options: MirrorOptions = MirrorOptions(),  # noqa: B008 (frozen)
    ) -> PageArea:
        """Attach (creating where needed) the area `name` on `replicas` servers."""
        single = self.single
        if single is not None and replicas == 1:
            return await single.swapon(name, size_bytes, pool_pages=pool_pages)  # exactly as without a fleet
        if replicas < 1:
            raise InvalidRequest("replicas must be at least 1")
        listings = await self.listings()
        order = self._order(name, listings)
        holders = []
        for server in order:
            listing = listings[server]
            if isinstance(listing, Listing):
                for info in listing.areas:
                    if info.name == name:
                        if info.size_bytes != size_bytes:
                            raise SizeMismatch(
                                f"area {name!r} exists on {server} with size_bytes {info.size_bytes},"
                                f" not {size_bytes} (FAILED_PRECONDITION)"
                            )
                        holders.append(server)
        # Where copies are already, then the placement order.
        candidates = holders + [s for s in order if s not in holders]
        attached: list[tuple[str, Area]] = []
        skipped: list[str] = []
        last: NetswapError | None = None
        for server in candidates:
            # Every copy there is, for a mirror: which of them has every write is on
            # their generation pages (MirroredArea.read_generations).
            if len(attached) >= replicas and (replicas == 1 or server not in holders):
                break
            try:
                area = await self.clients[server].swapon(
                    name, size_bytes, pool_pages=pool_pages if replicas == 1 else 1, timeout=CONTROL_TIMEOUT
                )
            except (ConnectionLost, NoSpace) as e:  # no room there, or no answer: the next one
                last = e
                skipped.append(server)
                continue
            attached.append((server, area))
        if not attached:
            raise last or ConnectionLost("no server to attach to")
        if replicas == 1:
            return attached[0][1]
        return await self._mirror(
            name,
            size_bytes,
            attached,
            skipped,
            order,
            replicas=replicas,
            pool_pages=pool_pages,
            options=options,
        )

    def _order(self, name: str, listings: dict[str, Listing | NetswapError]) -> list[str]:
        principals = {lst.principal for lst in listings.values() if isinstance(lst, Listing)}
        reachable = [lst for lst in listings.values() if isinstance(lst, Listing)]
        if not reachable:
            errors = [str(e) for e in listings.values()]
            raise ConnectionLost(f"no server can be reached: {'; '.join(errors)}")
        principal = next(iter(principals - {""}), "")
        return ranked(principal, name, self.servers)

    async def _mirror(
        self,
        name: str,
        size_bytes: int,
        attached: list[tuple[str, Area]],
        skipped: list[str],
        order: list[str],
        *,
        replicas: int,
        pool_pages: int | None,
        options: MirrorOptions,
    ) -> MirroredArea:
        slots = size_bytes // attached[0][1].page_size - 1  # the last page holds the generation
        copies = [Replica(s, self.clients[s], a, bytearray(slots), State.UP) for s, a in attached]
        # Places still missing go to servers that could not take the area now: they are
        # probed like any replica that is down, and get every slot once they answer.
        for server in skipped[: max(0, replicas - len(copies))]:
            missing = Replica(server, self.clients[server], None, bytearray(slots), State.DOWN)
            missing.mark_all()
            copies.append(missing)
        used = {r.server for r in copies}
        spares = [(s, self.clients[s]) for s in order if s not in used]
        area = MirroredArea(
            name, size_bytes, copies, spares=spares, pool_pages=pool_pages or 512, options=options
        )
        try:
            await area.read_generations(keep=replicas)  # which copy the others follow
        except BaseException:
            area.detach()
            raise
        area.start()
        return area

    async def areas(self) -> tuple[list[FleetArea], dict[str, NetswapError]]:
        """Every area of the caller on any server, with the servers holding a copy; and the
        servers that could not be asked."""
        listings = await self.listings()
        found: dict[str, tuple[int, list[Copy]]] = {}
        for server, listing in listings.items():
            if isinstance(listing, Listing):
                for info in listing.areas:
                    _, copies = found.setdefault(info.name, (info.size_bytes, []))
                    copies.append(Copy(server, "stored", info.pages_stored))
        areas = [FleetArea(n, size, copies) for n, (size, copies) in sorted(found.items())]
        unreachable = {s: e for s, e in listings.items() if isinstance(e, NetswapError)}
        if len(unreachable) == len(listings):
            raise next(iter(unreachable.values()))
        return areas, unreachable

    async def swapoff(self, name: str) -> list[str]:
        """Destroy the area `name` on every server that has it; the servers it was on."""
        if self.single is not None:
            await self.single.swapoff(name)
            return list(self.servers)
        areas, _ = await self.areas()
        holders = [c.server for a in areas if a.name == name for c in a.copies]
        if not holders:
            raise AreaNotFound(f"no area named {name!r} on any server (NOT_FOUND)")
        for server in holders:
            await self.clients[server].swapoff(name)
        return holders

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
