"""An area kept on several servers at once, so that losing a server loses no page.

Every copy (a *replica*) is an ordinary area on its server. A write is
acknowledged once every live replica has it; a read goes to one replica that
has every slot it asks for, and fails over to the next on an error or when
the replica does not answer within the failover timeout. A replica that fails
a request is marked down: I/O goes on with the others, and every slot
written meanwhile is marked in the replica's dirty map (one byte per slot,
allocated when the area is attached: nothing grows while serving).

A background task probes down replicas. One that answers again is
re-attached -- which also fences off whatever it still had in flight, since
re-attaching issues a new handle -- and, if it kept its data, only its dirty
slots are copied to it; a replica that came back empty (or the next server in
placement order, standing in for one down too long) gets every slot. Copies
run at a bounded rate beside the I/O, holding off writes to the slots being
copied; writes go to the replica being synced as well, and a slot it is
still behind on is never read from it. With every replica down, or none
holding a slot's latest write, requests fail with ConnectionLost -- the NBD
frontend retries until its deadline and then answers EIO, never zeros.

Which copies have every acknowledged write must outlive the frontend: one
that restarts finds copies that may differ, and only the one that saw a copy
fall behind knew which. So the last page of each replica's area is not the
mirror's (as md's superblock is not the array's): it holds a *generation*.
Before a write that a copy in step missed is acknowledged, the copies that
have it take the next generation (none in step reachable: the write fails);
a copy brought up to date takes the current one. At attach the copies of the
highest generation are the truth (the first of them, in placement order,
when several are: equal generations do not prove equal contents after a
crash with writes in flight) and every other copy is rebuilt from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from netswap.client.core import Area, PageArea, SwapClient
from netswap.client.errors import AreaNotFound, ConnectionLost, InvalidRequest, NetswapError
from netswap.client.pool import PagePool

log = logging.getLogger(__name__)

_ONES = memoryview(b"\x01" * 65536)  # views: a slice of them copies nothing
_NULS = memoryview(bytes(65536))
_GENERATION = struct.Struct("<16sQ")  # the generation page: magic, generation
_MAGIC = b"netswap mirror\x00\x01"


class State(enum.Enum):
    UP = "up"  # has every acknowledged write
    SYNCING = "syncing"  # reachable, takes writes; its dirty slots are being copied to it
    DOWN = "down"  # unreachable or failing: writes skip it, their slots go dirty


@dataclass(eq=False)
class Replica:
    server: str
    client: SwapClient
    area: Area | None  # None while no area is attached on `server`
    dirty: bytearray  # one byte per slot: 1 = behind on it
    state: State = State.DOWN
    dirty_count: int = 0
    since: float = field(default_factory=time.monotonic)  # when it entered its state
    probed: float = 0.0  # when it was last asked to come back
    # Bumped whenever the replica is marked down, re-attached or moved: a result
    # of a request sent before that says nothing about the replica since.
    epoch: int = 0
    handle_died: bool = False  # its server said our handle is unknown
    cursor: int = 0  # where the copies to it go on from
    # The highest generation its page may hold, as far as this frontend knows: a page write
    # that errs may still have landed.
    generation: int = 0
    confirmed: int | None = None  # what its page was last read or answered to hold; None: unknown

    def clean_for(self, first: int, end: int) -> bool:
        return self.dirty_count == 0 or self.dirty.find(1, first, end) < 0

    def clean_for_runs(self, runs: Sequence[tuple[int, int]]) -> bool:
        return self.dirty_count == 0 or all(self.dirty.find(1, first, end) < 0 for first, end in runs)

    def mark(self, runs: Sequence[tuple[int, int]]) -> None:
        for first, end in runs:
            self.dirty_count += (end - first) - self.dirty.count(1, first, end)
            _fill(self.dirty, first, end, _ONES)

    def clear(self, runs: Sequence[tuple[int, int]]) -> None:
        if self.dirty_count:
            for first, end in runs:
                self.dirty_count -= self.dirty.count(1, first, end)
                _fill(self.dirty, first, end, _NULS)

    def mark_all(self) -> None:
        self.mark([(0, len(self.dirty))])


@dataclass(frozen=True)
class MirrorOptions:
    failover_timeout: float = 1.0  # seconds a replica may take to answer before it is marked down
    probe_every: float = 1.0  # seconds between attempts to bring a down replica back
    control_timeout: float = 10.0  # seconds a re-attach (SwapOn) may take
    replace_after: float = 60.0  # seconds down before the next server in placement order stands in (0: never)
    resync_rate: float = 384 << 20  # bytes per second copied to replicas that are behind
    resync_workers: int = 4  # copies in flight at once


@dataclass
class _Spans:
    """Writes in flight and resync copies in progress, which must not overlap each other."""

    writes: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @staticmethod
    def overlap(spans: list[tuple[int, int]], first: int, end: int) -> bool:
        return any(a < end and first < b for a, b in spans)

    async def _wait(self) -> None:
        self.changed.clear()
        await self.changed.wait()

    async def write(self, first: int, end: int) -> tuple[int, int]:
        while self.copies and self.overlap(self.copies, first, end):
            await self._wait()
        span = (first, end)
        self.writes.append(span)
        return span

    def copy(self, first: int, end: int) -> tuple[int, int]:
        """Claim a span to copy: from now on, new writes to it wait (see settled)."""
        span = (first, end)
        self.copies.append(span)
        return span

    async def settled(self, first: int, end: int) -> None:
        """Wait until no write to the span is in flight."""
        while self.overlap(self.writes, first, end):
            await self._wait()

    def done(self, spans: list[tuple[int, int]], span: tuple[int, int]) -> None:
        spans.remove(span)
        self.changed.set()


class MirroredArea(PageArea):
    def __init__(
        self,
        name: str,
        size_bytes: int,
        replicas: list[Replica],
        *,
        spares: Sequence[tuple[str, SwapClient]] = (),
        pool_pages: int = 512,
        page_size: int = 4096,
        options: MirrorOptions = MirrorOptions(),
    ) -> None:
        if size_bytes < 2 * page_size:
            raise InvalidRequest("a mirrored area needs at least two pages (one holds its generation)")
        self.name = name
        self.page_size = page_size
        self.area_bytes = size_bytes  # of each replica's area: the mirror's slots and the generation page
        self.slot_count = size_bytes // page_size - 1
        if any(len(r.dirty) != self.slot_count for r in replicas):
            raise ValueError("a replica's dirty map must have one byte per slot of the mirror")
        self.replicas = replicas
        self.spares = list(spares)  # servers in placement order that hold no replica
        self.options = options
        attached = [r.area for r in replicas if r.area is not None]
        self.max_batch_pages = min(a.max_batch_pages for a in attached)
        self.takes_runs = all(a.takes_runs for a in attached)
        self.pool = PagePool(pool_pages, page_size)
        self.created = all(a.created for a in attached)
        self.generation = max(r.generation for r in replicas)  # what the copies in step hold
        self._highest = self.generation  # the highest any page may hold: the next is above it
        self._started_from = self.generation  # the truth's at attach (see _check_not_ahead)
        self._written: dict[str, int] = {}  # server -> the highest generation this frontend sent there
        self._generation_lock = asyncio.Lock()  # generation pages are written one round at a time
        # A copy whose page may hold the current generation left the set or was not read:
        # the next write moves the copies in step past it.
        self._bump_wanted = False
        # Allocated now, as everything the data path uses.
        self._page = bytearray(page_size)  # a generation page, written (under the lock) or read at attach
        self._generation_slot = range(self.slot_count, self.slot_count + 1)  # past the mirror's last slot
        self._probed_page = bytearray(page_size)  # the generation page of a replica coming back
        self._buffers = [bytearray(self.max_batch_pages * page_size) for _ in range(options.resync_workers)]
        self._zeros = bytes(self.max_batch_pages * page_size)
        self._paced_until = 0.0
        self._spans = _Spans()
        self._wake = asyncio.Event()  # a replica has something to sync
        self._tasks: list[asyncio.Task[None]] = []
        self.failovers = 0
        self.failed: str | None = None  # set when a replica was taken over: every request fails
        self.resync_bytes = 0
        self._degraded_since: float | None = None
        self._degraded_total = 0.0
        self._note_degraded()

    # -- state, for metrics and `netswap ls` ------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self.slot_count * self.page_size

    @property
    def degraded(self) -> bool:
        return any(r.state is not State.UP for r in self.replicas)

    @property
    def degraded_seconds(self) -> float:
        now = time.monotonic()
        return self._degraded_total + (
            now - self._degraded_since if self._degraded_since is not None else 0.0
        )

    @property
    def resync_remaining(self) -> int:
        return sum(r.dirty_count for r in self.replicas if r.state is not State.UP)

    def _note_degraded(self) -> None:
        now = time.monotonic()
        if self.degraded and self._degraded_since is None:
            self._degraded_since = now
        elif not self.degraded and self._degraded_since is not None:
            self._degraded_total += now - self._degraded_since
            self._degraded_since = None

    def _set(self, replica: Replica, state: State) -> None:
        if replica.state is not state:
            replica.state = state
            replica.since = time.monotonic()
            self._note_degraded()
            if state is not State.DOWN:
                self._wake.set()  # one to copy to, or one to copy from

    # -- the three operations --------------------------------------------------------

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        await self._to_all(slots, lambda area: area.write_batch(slots, pages))

    async def discard_batch(self, slots: Sequence[int]) -> None:
        await self._to_all(slots, lambda area: area.discard_batch(slots))

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        self._check()
        self._in_bounds(slots)
        runs = _runs(slots)
        for replica in self.replicas:  # placement order: the first live one with the slots reads
            if replica.state is State.DOWN or replica.area is None or not replica.clean_for_runs(runs):
                continue
            epoch = replica.epoch
            try:
                await replica.area.read_batch(slots, into)
                return
            except InvalidRequest:
                raise
            except NetswapError as e:
                self._lost(replica, e, epoch)
        raise ConnectionLost(f"no replica of {self.name!r} that holds these pages can be reached")

    async def _to_all(self, slots: Sequence[int], rpc: Callable[[Area], Awaitable[None]]) -> None:
        """rpc on every live replica at once; acknowledged when all of them have it."""
        self._check()
        first, end = self._in_bounds(slots)
        runs = _runs(slots)
        span = await self._spans.write(first, end)
        try:
            live = []
            for replica in self.replicas:
                if replica.state is State.DOWN or replica.area is None:
                    replica.mark(runs)  # it misses this write
                else:
                    live.append(replica)
            if not live:
                raise ConnectionLost(f"no replica of {self.name!r} can be reached")
            epochs = [r.epoch for r in live]
            try:
                errors = await _each(live, rpc)
            except BaseException:
                # Cancelled (or worse) with the write on its way: the copies may now
                # differ. Whatever one in step (else the first) has, the others follow.
                keep = next((r for r in live if r.state is State.UP), live[0])
                for replica in live:
                    if replica is not keep:
                        self._behind(replica, runs)
                raise
            self._took(live, epochs, errors, runs)
            if self._fell_behind():
                await self._next_generation()  # before the write is acknowledged
        finally:
            self._spans.done(self._spans.writes, span)

    def _took(
        self,
        live: list[Replica],
        epochs: list[int],
        errors: list[BaseException | None],
        runs: list[tuple[int, int]],
    ) -> None:
        """Account a write's outcome on each replica; raise if it was not acknowledged."""
        landed = any(e is None for e in errors)
        for replica, epoch, error in zip(live, epochs, errors, strict=True):
            if error is not None and not isinstance(error, InvalidRequest):
                self._lost(replica, error, epoch)
            if error is None and replica.epoch == epoch:
                replica.clear(runs)  # a syncing replica is up to date on these slots now
            elif landed:  # it missed (or was lost since) a write another copy has
                self._behind(replica, runs)
        for replica in live:
            if replica.state is State.SYNCING and not replica.dirty_count:
                self._wake.set()  # the writes brought it up to date: a copier says so
        rejected = next((e for e in errors if isinstance(e, InvalidRequest)), None)
        if rejected is not None:
            raise rejected
        if not landed:
            raise ConnectionLost(f"no replica of {self.name!r} took the write")

    def _behind(self, replica: Replica, runs: list[tuple[int, int]]) -> None:
        """A reachable replica missed a write: it is no longer in step until copied to."""
        replica.mark(runs)
        if replica.state is State.UP:
            self._set(replica, State.SYNCING)

    def _check(self) -> None:
        if self.failed is not None:
            raise AreaNotFound(self.failed)

    def _in_bounds(self, slots: Sequence[int]) -> tuple[int, int]:
        """The slots' span; InvalidRequest past the mirror's last slot (the generation page's)."""
        first, end = _span(slots) if len(slots) else (0, 0)
        if first < 0 or end > self.slot_count:
            raise InvalidRequest(f"slots {first}-{end - 1} are outside the mirror's {self.slot_count} slots")
        return first, end

    # -- generations -----------------------------------------------------------------

    def _fell_behind(self) -> bool:
        """Whether a copy whose page may hold the current generation (or a later one) misses a write."""
        return self._bump_wanted or any(
            r.generation >= self.generation and r.dirty_count for r in self.replicas
        )

    def _in_step(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is State.UP and not r.dirty_count and r.area is not None]

    async def _next_generation(self) -> None:
        """Give the copies in step the next generation, so that a copy behind is known as such
        after a restart; raise ConnectionLost if no copy in step takes it."""
        async with self._generation_lock:
            while self._fell_behind():
                in_step = self._in_step()
                if not in_step:
                    raise ConnectionLost(f"no replica of {self.name!r} holds every write")
                generation = self._highest + 1  # above any page, even one whose write erred
                if await self._write_generation(in_step, generation):
                    self.generation = generation
                    self._bump_wanted = False
                    log.warning("replicas of %r in step now at generation %d", self.name, self.generation)

    async def _caught_up(self, replica: Replica) -> None:
        """A replica brought up to date takes the current generation (one written since it
        caught up and missed meanwhile is caught by _fell_behind on that write's path)."""
        async with self._generation_lock:
            if replica in self._in_step() and replica.confirmed != self.generation:
                await self._write_generation([replica], self.generation)

    async def _write_generation(self, replicas: list[Replica], generation: int) -> bool:
        """Write `generation` to the replicas' pages; whether any of them answered that it took it."""
        _GENERATION.pack_into(self._page, 0, _MAGIC, generation)
        slots = self._generation_slot
        self._highest = max(self._highest, generation)
        for replica in replicas:  # from now on each may hold it, whatever it answers
            replica.generation = max(replica.generation, generation)
            replica.confirmed = None
            self._written[replica.server] = max(self._written.get(replica.server, 0), generation)
        epochs = [r.epoch for r in replicas]
        errors = await _each(replicas, lambda area: area.write_batch(slots, [memoryview(self._page)]))
        for replica, epoch, error in zip(replicas, epochs, errors, strict=True):
            if error is None:
                replica.generation = replica.confirmed = generation
            else:
                self._lost(replica, error, epoch)
        return any(e is None for e in errors)

    async def _read_generation(self, replica: Replica, page: bytearray) -> int:
        """The generation on a replica's page (0 for a page never written), read into `page`."""
        assert replica.area is not None
        await replica.area.read_batch(self._generation_slot, [memoryview(page)])
        magic, generation = _GENERATION.unpack_from(page)
        return int(generation) if magic == _MAGIC else 0

    async def _check_not_ahead(self, replica: Replica) -> bool:
        """Learn what a replica that kept its data holds on its page (False if it could not be
        read). One above both what this frontend may have written there and the truth it
        started from was ahead of that truth while it could not be reached: say so, and
        rebuild it too."""
        try:
            generation = await self._read_generation(replica, self._probed_page)
        except NetswapError:
            return False
        written = max(replica.generation, self._written.get(replica.server, 0))
        ahead = generation > max(written, self._started_from)
        replica.generation = replica.confirmed = generation
        self._highest = max(self._highest, generation)
        if ahead:
            log.error(
                "replica of %r on %s is at generation %d, ahead of the %d this frontend started from:"
                " it was unreachable at attach, and writes only it had were not served; rebuilding it",
                self.name, replica.server, generation, self._started_from,
            )  # fmt: skip
            replica.mark_all()
        return True

    async def read_generations(self, keep: int | None = None) -> None:
        """Read every attached replica's generation page, and take the highest generation's
        copies as the truth: the first of them in placement order, from which every other
        copy is rebuilt (see the module docstring). Keep `keep` replicas (the truth and the
        first others in placement order), leaving the rest where they are, detached; then
        give the copies in step the next generation. Raises ConnectionLost if none takes it."""
        for replica in self.replicas:
            if replica.area is None or replica.state is State.DOWN:
                continue  # its page may hold any generation: the bump below moves past it
            epoch = replica.epoch
            try:
                replica.generation = await self._read_generation(replica, self._page)
                replica.confirmed = replica.generation
            except NetswapError as e:
                self._lost(replica, e, epoch)
                replica.mark_all()  # whether it is behind is unknown: rebuilt when it is back
        reached = [r for r in self.replicas if r.state is not State.DOWN and r.area is not None]
        if not reached:
            raise ConnectionLost(f"no replica of {self.name!r} can be reached")
        existing = [r for r in reached if not r.area.created]  # type: ignore[union-attr]
        truth = max(existing, key=lambda r: r.generation) if existing else None  # the first of the highest
        self.generation = self._started_from = truth.generation if truth is not None else 0
        self._highest = max(r.generation for r in reached)
        for replica in reached:
            if truth is not None and replica is not truth:
                replica.mark_all()
                self._set(replica, State.SYNCING)
        if keep is not None and len(self.replicas) > keep:
            self._keep(truth, keep)
        # Before any I/O the copies in step move past every other copy's page -- one
        # made now holds none, and must not tie with the truth if we restart again
        # before a write -- and a copy being rebuilt takes a generation once it is.
        self._bump_wanted = True
        await self._next_generation()

    def _keep(self, truth: Replica | None, keep: int) -> None:
        """Trim to `keep` replicas: the truth, then reachable copies, then the rest, each in
        placement order. The others stay on their servers (`netswap ls` shows them) and
        will not see the writes to come: read_generations then moves the copies kept past
        their generation."""
        ranked = sorted(self.replicas, key=lambda r: (r is not truth, r.state is State.DOWN))
        kept = ranked[:keep]
        for replica in ranked[keep:]:
            if replica.area is not None:
                replica.area.detach()
            self.spares.append((replica.server, replica.client))
        self.replicas = [r for r in self.replicas if r in kept]
        attached = [r.area for r in self.replicas if r.area is not None]
        self.takes_runs = all(a.takes_runs for a in attached)  # max_batch_pages stays: the buffers fit it
        self.created = all(a.created for a in attached)
        self._note_degraded()

    def _lost(self, replica: Replica, error: BaseException, epoch: int) -> None:
        """Mark a replica down for an error of a request sent to it at `epoch`."""
        if replica.epoch != epoch:
            return  # sent before it was marked down or re-attached: says nothing of it now
        if isinstance(error, AreaNotFound):
            replica.handle_died = True
        if replica.state is not State.DOWN:
            self.failovers += 1
            replica.epoch += 1
            log.warning("replica of %r on %s is down: %s", self.name, replica.server, error)
            self._set(replica, State.DOWN)

    # -- bringing replicas back ------------------------------------------------------

    def start(self) -> None:
        """Start the background work: probing down replicas, copying to those behind."""
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._probe_loop())] + [
                asyncio.ensure_future(self._copy_loop(buf)) for buf in self._buffers
            ]

    async def _probe_loop(self) -> None:
        while True:
            for replica in self.replicas:
                if replica.state is State.DOWN:
                    try:
                        await self._probe(replica)
                    except Exception:  # a bug must not end probing: a down replica would stay down
                        log.exception("probing the replica of %r on %s", self.name, replica.server)
            await asyncio.sleep(self.options.probe_every)

    async def _probe(self, replica: Replica) -> None:
        opts = self.options
        now = time.monotonic()
        if opts.replace_after and now - replica.since > opts.replace_after and self.spares:
            self._replace(replica)
        replica.probed = now
        try:
            if replica.handle_died and replica.area is not None and await replica.area.superseded():
                # Our handle died while its server kept running: another client
                # attached the area. Taking it back would make two writers of one
                # swap area; the device fails instead (see AreaDevice).
                self.failed = (
                    f"area {self.name!r} on {replica.server} was attached by another client while its"
                    " server kept running; not taking it back"
                )
                log.error("%s", self.failed)
                return
            if replica.area is None:
                replica.area = await replica.client.swapon(
                    self.name, self.area_bytes, pool_pages=1, timeout=opts.control_timeout
                )
                created = replica.area.created
            else:
                created = await replica.area.reattach(timeout=opts.control_timeout)
        except NetswapError as e:
            log.debug("replica of %r on %s still down: %s", self.name, replica.server, e)
            return
        replica.handle_died = False
        replica.epoch += 1
        if not created and not await self._check_not_ahead(replica):
            log.debug(
                "replica of %r on %s: its generation page cannot be read yet", self.name, replica.server
            )
            return  # what its page holds decides how it comes back: the next probe tries again
        # A stand-in or restarted server may take smaller batches: the batcher re-cuts to this.
        self.max_batch_pages = min(self.max_batch_pages, replica.area.max_batch_pages)
        if created:  # empty: every slot must come from another replica
            replica.mark_all()
            replica.generation, replica.confirmed = 0, None
        log.warning(
            "replica of %r on %s is back (%s); %d slots to copy",
            self.name, replica.server, "empty" if created else "kept its data", replica.dirty_count,
        )  # fmt: skip
        self._set(replica, State.SYNCING if replica.dirty_count else State.UP)
        if self._fell_behind():  # a page behind that ties with the copies in step, or beats them
            with contextlib.suppress(ConnectionLost):  # none in step: the next write fails and tells
                await self._next_generation()
        if replica.state is State.UP:
            await self._caught_up(replica)

    def _replace(self, replica: Replica) -> None:
        """Let the next server in placement order stand in for a replica down too long."""
        server, client = self.spares.pop(0)
        self.spares.append((replica.server, replica.client))
        log.warning("replica of %r on %s down too long: moving it to %s", self.name, replica.server, server)
        if replica.area is not None:
            replica.area.detach()
        replica.server, replica.client, replica.area = server, client, None
        replica.mark_all()
        replica.generation, replica.confirmed = 0, None
        self._bump_wanted = True  # the copy given up keeps its page, and will miss what comes
        replica.since = time.monotonic()
        replica.epoch += 1
        replica.handle_died = False

    async def _copy_loop(self, buf: bytearray) -> None:
        """One copier: the next run of dirty slots of a syncing replica, from a replica that has it."""
        while True:
            self._wake.clear()  # before looking: whatever sets it from now on is seen below or wakes us
            await self._promote_caught_up()
            claim = self._claim()
            if claim is None:
                await self._wake.wait()
                continue
            # Paced before it is claimed: a claimed span holds off writes to it.
            await self._pace((claim[2] - claim[1]) * self.page_size)
            claim = self._claim()
            if claim is None:
                continue
            target, first, end = claim
            span = self._spans.copy(first, end)  # now, before anything awaits: no other copier takes it
            try:
                copied = await self._copy(target, first, end, buf)
            except NetswapError:
                continue  # a replica was lost (see _lost); the next claim finds what is left
            except Exception:  # a bug must not end this copier: the replica would never catch up
                log.exception("copying slots %d-%d of %r to %s", first, end, self.name, target.server)
                await asyncio.sleep(self.options.probe_every)
                continue
            finally:
                self._spans.done(self._spans.copies, span)
            if not copied:  # nobody reachable has these pages now
                await asyncio.sleep(self.options.probe_every)

    async def _promote_caught_up(self) -> None:
        """Syncing replicas with nothing left to copy (by copies or by writes) are in step."""
        for target in self.replicas:
            if target.state is State.SYNCING and target.dirty_count == 0:
                log.warning("replica of %r on %s is up to date", self.name, target.server)
                self._set(target, State.UP)
                try:
                    await self._caught_up(target)
                except Exception:  # a bug must not end this copier
                    log.exception("giving %s the generation of %r", target.server, self.name)

    async def _pace(self, size: int) -> None:
        """Wait for this copy's turn at the resync rate (shared by every copier)."""
        now = time.monotonic()
        at = max(now, self._paced_until)
        self._paced_until = at + size / self.options.resync_rate
        if at > now:
            await asyncio.sleep(at - now)

    def _claim(self) -> tuple[Replica, int, int] | None:
        """The next run of dirty slots some replica can be brought up to date on: from where the
        last copy to it ended, skipping runs being copied and runs no reachable replica has."""
        for target in self.replicas:
            if target.state is not State.SYNCING or not target.dirty_count:
                continue
            start, wrapped = target.cursor, False
            while True:
                first = target.dirty.find(1, start)
                if first < 0:
                    if wrapped or start == 0:
                        break
                    start, wrapped = 0, True
                    continue
                if wrapped and first >= target.cursor:
                    break
                end = target.dirty.find(0, first, first + self.max_batch_pages)
                end = min(first + self.max_batch_pages if end < 0 else end, self.slot_count)
                sourced = any(r is not target and self._has(r, first, end) for r in self.replicas)
                if sourced and not self._spans.overlap(self._spans.copies, first, end):
                    target.cursor = end if end < self.slot_count else 0
                    return target, first, end  # the caller claims it before it awaits anything
                start = end
        return None

    async def _copy(self, target: Replica, first: int, end: int, buf: bytearray) -> bool:
        """Copy slots [first, end) to `target` from a replica that has them; False if none can."""
        await self._spans.settled(first, end)
        if target.state is not State.SYNCING or target.area is None or target.dirty.find(1, first, end) < 0:
            return True  # written (or lost) meanwhile: nothing to copy here
        source = next((r for r in self.replicas if r is not target and self._has(r, first, end)), None)
        if source is None or source.area is None:
            return False
        slots = range(first, end)
        data = memoryview(buf)[: (end - first) * self.page_size]
        source_epoch, target_epoch = source.epoch, target.epoch
        try:
            await source.area.read_batch(slots, [data])
        except NetswapError as e:
            self._lost(source, e, source_epoch)
            raise
        try:
            if _zero(buf, len(data), self._zeros):  # never written, or discarded: no page to send
                await target.area.discard_batch(slots)
            else:
                await target.area.write_batch(slots, [data])
        except NetswapError as e:
            self._lost(target, e, target_epoch)
            raise
        target.clear([(first, end)])
        self.resync_bytes += len(data)
        return True

    @staticmethod
    def _has(replica: Replica, first: int, end: int) -> bool:
        return replica.state is not State.DOWN and replica.area is not None and replica.clean_for(first, end)

    # -- life ------------------------------------------------------------------------

    async def reattach(self) -> bool:
        """Replicas come back on their own (see the module docstring): nothing to do here."""
        return False

    async def superseded(self) -> bool:
        """True once a replica was found taken over by another client (the device then fails)."""
        return self.failed is not None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def detach(self) -> None:
        """Stop the background work and free the pools, leaving every replica on its server."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for replica in self.replicas:
            if replica.area is not None:
                replica.area.detach()
        self.pool.close()

    async def swapoff(self) -> None:
        """Destroy every replica that can be reached (the others stay where they are)."""
        await self.close()
        for replica in self.replicas:
            if replica.area is not None:
                with contextlib.suppress(NetswapError):
                    await replica.area.swapoff()
        self.pool.close()


async def _each(live: list[Replica], rpc: Callable[[Area], Awaitable[None]]) -> list[BaseException | None]:
    """rpc on every replica at once (the first in this task, the rest in tasks of their own)."""

    async def one(replica: Replica) -> BaseException | None:
        assert replica.area is not None
        try:
            await rpc(replica.area)
        except NetswapError as e:
            return e
        return None

    if len(live) == 1:
        return [await one(live[0])]
    others = [asyncio.ensure_future(one(r)) for r in live[1:]]
    try:
        first = await one(live[0])
    except BaseException:
        for task in others:
            task.cancel()
        raise
    return [first, *[await task for task in others]]


def _span(slots: Sequence[int]) -> tuple[int, int]:
    if type(slots) is range:
        return slots.start, slots.stop
    return min(slots), max(slots) + 1


def _runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """slots as (first, end) runs of consecutive slots."""
    if type(slots) is range:
        return [(slots.start, slots.stop)]
    out: list[tuple[int, int]] = []
    for slot in slots:
        if out and out[-1][1] == slot:
            out[-1] = (out[-1][0], slot + 1)
        else:
            out.append((slot, slot + 1))
    return out


def _zero(buf: bytearray, size: int, zeros: bytes) -> bool:
    """Whether buf[:size] is all zeros, compared in place (no copy: reserve safety)."""
    return buf == zeros if size == len(buf) else buf.count(0, 0, size) == size


def _fill(buf: bytearray, first: int, end: int, source: memoryview) -> None:
    while first < end:
        step = min(end - first, len(source))
        buf[first : first + step] = source[:step]
        first += step
