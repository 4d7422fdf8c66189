"""The mirror's logic against a reference, under random writes, reads, failures, losses and returns.

Replicas here are in-memory stand-ins for servers (the mirror is what is under
test; tests/nbd/test_mirror.py runs it against real servers). After every
step: a read returns the latest acknowledged data or fails, never anything
else; a replica marked up holds every acknowledged write, and a syncing one
every slot it is not behind on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netswap.client.errors import AreaNotFound, ConnectionLost, InvalidRequest, NetswapError
from netswap.client.mirror import _GENERATION as GENERATION
from netswap.client.mirror import _MAGIC as MAGIC
from netswap.client.mirror import MirroredArea, MirrorOptions, Replica, State

PS = 4096
SLOTS = 32
BATCH = 8


class FakeServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.pages: dict[str, dict[int, bytes]] = {}  # area -> slot -> page
        self.epoch = 0  # bumped when it loses its data
        self.lag = 0  # turns of the loop a request spends on its way (and a reply on its way back)
        self.mute = False  # requests land, but no reply comes back (a crash after the write, a timeout)
        self.unreadable = False  # reads fail (a disk error, say); writes still work

    async def trip(self) -> None:
        for _ in range(self.lag + 1):
            await asyncio.sleep(0)

    def check(self) -> None:
        if not self.up:
            raise ConnectionLost(f"{self.name} is down")


class FakeArea:
    """What the mirror uses of an Area, on a FakeServer."""

    page_size = PS
    max_batch_pages = BATCH
    takes_runs = True

    def __init__(self, server: FakeServer, name: str, created: bool) -> None:
        self.server, self.name, self.created = server, name, created
        self.epoch = server.epoch

    def _pages(self) -> dict[int, bytes]:
        self.server.check()
        if self.epoch != self.server.epoch:  # the server lost the area: our handle is dead
            raise ConnectionLost("unknown handle")
        return self.server.pages.setdefault(self.name, {})

    def _answer(self) -> None:
        """A write's reply: it reaches the mirror only from a server still up and answering."""
        self.server.check()
        if self.server.mute:
            raise ConnectionLost(f"{self.server.name} did not answer in time")

    # Each request takes turns of the loop on its way, as a real one does: a
    # write lands after its trip there, a read is what was stored when it
    # arrived, seen after its trip back.

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        blob = b"".join(bytes(p) for p in pages)
        await self.server.trip()
        store = self._pages()
        for i, slot in enumerate(slots):
            store[slot] = blob[i * PS : (i + 1) * PS]
        await self.server.trip()
        self._answer()

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        await asyncio.sleep(0)
        if self.server.unreadable:
            raise ConnectionLost(f"{self.server.name} failed a read")
        store = self._pages()
        blob = b"".join(store.get(s, bytes(PS)) for s in slots)
        await self.server.trip()
        self._pages()  # and it is still there to answer
        pos = 0
        for view in into:
            view[:] = blob[pos : pos + len(view)]
            pos += len(view)

    async def discard_batch(self, slots: Sequence[int]) -> None:
        await self.server.trip()
        store = self._pages()
        for slot in slots:
            store.pop(slot, None)
        await self.server.trip()
        self._answer()

    async def reattach(self, timeout: float | None = None) -> bool:
        self.server.check()
        created = self.epoch != self.server.epoch or self.name not in self.server.pages
        self.epoch = self.server.epoch
        self.server.pages.setdefault(self.name, {})
        return created

    def detach(self) -> None:
        pass


class FakeClient:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    async def swapon(self, name: str, size: int, **kw: Any) -> FakeArea:
        self.server.check()
        created = name not in self.server.pages
        self.server.pages.setdefault(name, {})
        return FakeArea(self.server, name, created)


def page(value: int) -> bytes:
    return bytes([value]) * PS


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.servers = [FakeServer(f"s{i}") for i in range(3)]
        replicas = [
            Replica(
                s.name,
                cast(Any, FakeClient(s)),
                cast(Any, FakeArea(s, "m", True)),
                bytearray(SLOTS),
                State.UP,
            )
            for s in self.servers[:2]
        ]
        for s in self.servers[:2]:
            s.pages["m"] = {}
        spares = [(self.servers[2].name, cast(Any, FakeClient(self.servers[2])))]
        self.mirror = self.loop.run_until_complete(self._make(replicas, spares))
        self.loop.run_until_complete(self.mirror.read_generations(keep=2))  # as the fleet attaches
        # slot -> the values a read may return: one once a write is acknowledged, more while unknown
        self.ref: dict[int, set[bytes]] = {s: {bytes(PS)} for s in range(SLOTS)}
        self.value = 0

    async def _make(self, replicas: list[Replica], spares: list[tuple[str, Any]]) -> MirroredArea:
        options = MirrorOptions(replace_after=0, probe_every=0.001, resync_workers=2)
        # One page more than the mirror's slots: the last holds its generation.
        return MirroredArea("m", (SLOTS + 1) * PS, replicas, spares=spares, pool_pages=16, options=options)

    def teardown(self) -> None:
        self.mirror.detach()
        self.loop.close()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # -- I/O ------------------------------------------------------------------------

    @rule(first=st.integers(0, SLOTS - 1), count=st.integers(1, BATCH), discard=st.booleans())
    def write(self, first: int, count: int, discard: bool) -> None:
        slots = range(first, min(first + count, SLOTS))
        self.value = self.value % 250 + 1
        values = [bytes(PS) if discard else page(self.value + i % 3) for i in range(len(slots))]
        try:
            if discard:
                self.run(self.mirror.discard_batch(slots))
            else:
                self.run(self.mirror.write_batch(slots, [memoryview(b"".join(values))]))
        except NetswapError:
            for slot, value in zip(slots, values, strict=True):  # not acknowledged: either may be there
                self.ref[slot].add(value)
            return
        for slot, value in zip(slots, values, strict=True):
            self.ref[slot] = {value}

    @rule(first=st.integers(0, SLOTS - 1), count=st.integers(1, BATCH))
    def read(self, first: int, count: int) -> None:
        slots = range(first, min(first + count, SLOTS))
        buf = bytearray(len(slots) * PS)
        able = any(r.state is State.UP and self._intact(r) for r in self.mirror.replicas)
        try:
            self.run(self.mirror.read_batch(slots, [memoryview(buf)]))
        except ConnectionLost:
            assert not able, "a replica with every write was up, and the read failed"
            return
        for i, slot in enumerate(slots):
            assert bytes(buf[i * PS : (i + 1) * PS]) in self.ref[slot], f"slot {slot} read wrong data"

    # -- servers --------------------------------------------------------------------

    @rule(i=st.integers(0, 2))
    def fail(self, i: int) -> None:
        self.servers[i].up = False

    @rule(i=st.integers(0, 2))
    def lose(self, i: int) -> None:
        """The machine is gone, and comes back empty."""
        server = self.servers[i]
        server.up = False
        server.pages.clear()
        server.epoch += 1

    @rule(i=st.integers(0, 2))
    def restore(self, i: int) -> None:
        self.servers[i].up = True

    @rule(i=st.integers(0, 2), lag=st.integers(0, 4))
    def slow(self, i: int, lag: int) -> None:
        self.servers[i].lag = lag

    @rule(i=st.integers(0, 2), mute=st.booleans())
    def mute(self, i: int, mute: bool) -> None:
        self.servers[i].mute = mute

    @precondition(lambda self: any(r.state is State.DOWN for r in self.mirror.replicas))
    @rule()
    def stand_in(self) -> None:
        down = next(r for r in self.mirror.replicas if r.state is State.DOWN)
        self.mirror._replace(down)

    @rule()
    def probe(self) -> None:
        """Down replicas that answer come back as syncing; nothing is copied yet."""

        async def probe() -> None:
            for replica in self.mirror.replicas:
                if replica.state is State.DOWN:
                    await self.mirror._probe(replica)

        self.run(probe())

    def _current(self, server: FakeServer) -> bool:
        """Whether the server holds a copy whose page has the mirror's generation."""
        page = server.pages.get("m", {}).get(SLOTS)
        return page is not None and GENERATION.unpack_from(page) == (MAGIC, self.mirror.generation)

    @precondition(
        lambda self: (
            all(s.up and not s.mute for s in self.servers if "m" in s.pages)
            and any(self._current(s) for s in self.servers)
        )
    )
    @rule()
    def restart(self) -> None:
        """The frontend restarts: a new mirror found as the fleet finds it -- every server that
        holds a copy, then others until there are two -- knowing only what the servers hold.
        Out of this model, as docs/fleet.md says: a copy unreachable at attach (its
        generation is unknown until it answers), and every copy of the latest generation
        lost."""
        old = self.mirror
        old.detach()

        async def attach() -> MirroredArea:
            holders = [s for s in self.servers if "m" in s.pages]
            chosen = holders + [s for s in self.servers if s not in holders and s.up]
            chosen = chosen[: max(2, len(holders))]
            replicas = []
            for server in chosen:
                area = await FakeClient(server).swapon("m", (SLOTS + 1) * PS)
                client = cast(Any, FakeClient(server))
                replicas.append(Replica(server.name, client, cast(Any, area), bytearray(SLOTS), State.UP))
            for server in [s for s in self.servers if s not in chosen][: 2 - len(replicas)]:
                missing = Replica(server.name, cast(Any, FakeClient(server)), None, bytearray(SLOTS))
                missing.mark_all()
                replicas.append(missing)
            used = {r.server for r in replicas}
            spares = [(s.name, cast(Any, FakeClient(s))) for s in self.servers if s.name not in used]
            mirror = await self._make(replicas, spares)
            await mirror.read_generations(keep=2)
            return mirror

        self.mirror = self.run(attach())

    @rule()
    def settle(self) -> None:
        """What the background tasks do: probe down replicas, copy what syncing ones lack."""
        self.run(self._settle())
        for replica in self.mirror.replicas:  # none left syncing with nothing to copy
            assert replica.state is not State.SYNCING or replica.dirty_count, replica.server

    @rule(first=st.integers(0, SLOTS - 1), count=st.integers(1, BATCH), head_start=st.integers(0, 3))
    def write_while_settling(self, first: int, count: int, head_start: int) -> None:
        """A write that races the copies to a syncing replica."""
        slots = range(first, min(first + count, SLOTS))
        self.value = self.value % 250 + 1
        values = [page(self.value)] * len(slots)

        async def both() -> BaseException | None:
            write = asyncio.ensure_future(self.mirror.write_batch(slots, [memoryview(b"".join(values))]))
            for _ in range(head_start):  # the write this far along when the copies start
                await asyncio.sleep(0)
            await self._settle()
            try:
                await write
            except NetswapError as e:
                return e
            return None

        failed = self.run(both())
        for slot, value in zip(slots, values, strict=True):
            if failed:
                self.ref[slot].add(value)
            else:
                self.ref[slot] = {value}

    async def _settle(self) -> None:
        for replica in self.mirror.replicas:
            if replica.state is State.DOWN:
                await self.mirror._probe(replica)
        while (claim := self.mirror._claim()) is not None:
            target, first, end = claim
            span = self.mirror._spans.copy(first, end)
            try:
                copied = await self.mirror._copy(target, first, end, bytearray(BATCH * PS))
            except NetswapError:
                copied = True
            finally:
                self.mirror._spans.done(self.mirror._spans.copies, span)
            if not copied:
                break
        await self.mirror._promote_caught_up()  # as each copier does before it looks for work

    def _server(self, replica: Replica) -> FakeServer:
        return next(s for s in self.servers if s.name == replica.server)

    def _intact(self, replica: Replica) -> bool:
        """Its server is up and has kept what this replica wrote there."""
        server = self._server(replica)
        return server.up and replica.area is not None and replica.area.epoch == server.epoch  # type: ignore[attr-defined]

    # -- what must always hold --------------------------------------------------------

    @invariant()
    def replicas_hold_what_they_claim(self) -> None:
        for replica in self.mirror.replicas:
            assert replica.state is not State.UP or not replica.dirty_count, f"{replica.server} up but behind"
            if replica.state is State.DOWN or replica.area is None:
                continue
            server = self._server(replica)
            if replica.area.epoch != server.epoch:  # type: ignore[attr-defined]
                continue  # lost since: the next request finds out
            stored = server.pages.get("m", {})
            for slot in range(SLOTS):
                if replica.state is State.UP or replica.dirty[slot] == 0:
                    got = stored.get(slot, bytes(PS))
                    assert got in self.ref[slot], f"{replica.server} ({replica.state}) slot {slot} is stale"


MirrorMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_the_mirror_against_a_reference = MirrorMachine.TestCase


async def _pair(lag: int) -> tuple[MirroredArea, FakeServer, FakeServer]:
    """A mirror whose first replica (the source) is slow and whose second is syncing, all behind."""
    source, target = FakeServer("s0"), FakeServer("s1")
    source.lag = lag
    replicas = []
    for server, state in ((source, State.UP), (target, State.SYNCING)):
        server.pages["m"] = {}
        area = FakeArea(server, "m", True)
        replicas.append(
            Replica(server.name, cast(Any, FakeClient(server)), cast(Any, area), bytearray(SLOTS), state)
        )
    replicas[1].mark_all()
    return MirroredArea("m", (SLOTS + 1) * PS, replicas, pool_pages=16), source, target


async def _copy_all(mirror: MirroredArea) -> None:
    while (claim := mirror._claim()) is not None:
        target, first, end = claim
        span = mirror._spans.copy(first, end)
        try:
            await mirror._copy(target, first, end, bytearray(BATCH * PS))
        finally:
            mirror._spans.done(mirror._spans.copies, span)


@pytest.mark.parametrize("write_first", [True, False])
async def test_a_copy_and_a_write_to_the_same_slots_never_leave_the_old_data(write_first: bool) -> None:
    # The copy reads the slow source, then writes the target; the write goes to both.
    # Whichever starts first, the target ends with the write's data.
    mirror, source, target = await _pair(lag=3)
    source.pages["m"][0] = page(1)
    slots = range(0, 1)
    if write_first:
        write = asyncio.ensure_future(mirror.write_batch(slots, [memoryview(page(2))]))
        await asyncio.sleep(0)  # the write is on its way
        await _copy_all(mirror)
    else:
        copy = asyncio.ensure_future(_copy_all(mirror))
        await asyncio.sleep(0)  # the copy has claimed slot 0 and is reading it
        write = asyncio.ensure_future(mirror.write_batch(slots, [memoryview(page(2))]))
        await copy
    await write
    await _copy_all(mirror)
    assert target.pages["m"].get(0) == page(2) == source.pages["m"][0]
    assert mirror.replicas[1].dirty_count == 0
    mirror.detach()


async def test_a_late_result_says_nothing_of_a_replica_re_attached_since() -> None:
    # B acknowledges a write, then its server restarts empty and B is re-attached
    # (every slot to copy); only then does A, the slow one, answer. B's old
    # acknowledgement must not mark it up to date on the slot it no longer has.
    a, b = FakeServer("a"), FakeServer("b")
    replicas = []
    for server in (a, b):
        server.pages["m"] = {}
        area = FakeArea(server, "m", True)
        replicas.append(
            Replica(server.name, cast(Any, FakeClient(server)), cast(Any, area), bytearray(SLOTS), State.UP)
        )
    mirror = MirroredArea("m", (SLOTS + 1) * PS, replicas, pool_pages=16)
    a.lag = 20
    write = asyncio.ensure_future(mirror.write_batch(range(3, 4), [memoryview(page(7))]))
    while 3 not in b.pages["m"]:  # B has it; A not yet
        await asyncio.sleep(0)
    b.pages.clear()  # B's machine: gone, and back empty
    b.epoch += 1
    mirror._lost(replicas[1], ConnectionLost("b restarted"), replicas[1].epoch)
    await mirror._probe(replicas[1])
    await write
    assert replicas[1].dirty[3] == 1  # still behind on slot 3
    a.up = False  # losing A now: slot 3 is not read from B
    with pytest.raises(ConnectionLost):
        await mirror.read_batch(range(3, 4), [memoryview(bytearray(PS))])
    mirror.detach()


async def test_runs_nobody_has_do_not_hold_up_the_copies_behind_them() -> None:
    mirror, source, target = await _pair(lag=0)
    mirror.replicas[1].clear([(0, SLOTS)])
    mirror.replicas[0].mark([(0, 8)])  # the source itself is behind on 0-7: nobody has them
    mirror.replicas[1].mark([(0, 8), (20, 21)])
    source.pages["m"][20] = page(9)
    await _copy_all(mirror)
    assert target.pages["m"].get(20) == page(9) and mirror.replicas[1].dirty[20] == 0
    mirror.detach()


async def test_a_late_error_from_before_a_reattach_leaves_the_replica_up() -> None:
    mirror, _, _ = await _pair(lag=0)
    replica = mirror.replicas[0]
    sent_at = replica.epoch  # a request goes out ...
    mirror._lost(replica, ConnectionLost("s0 restarting"), replica.epoch)  # ... the replica is lost
    await mirror._probe(replica)  # and back, re-attached with a new handle
    assert replica.state is State.UP
    mirror._lost(replica, AreaNotFound("unknown handle"), sent_at)  # the old request's answer
    assert replica.state is State.UP and not replica.handle_died
    assert mirror.failed is None
    mirror.detach()


async def test_a_replica_back_with_smaller_batches_lowers_the_mirrors_limit() -> None:
    mirror, _, _ = await _pair(lag=0)
    replica = mirror.replicas[0]
    mirror._lost(replica, ConnectionLost("s0 restarting"), replica.epoch)
    cast(Any, replica.area).max_batch_pages = BATCH // 2  # its server now takes half as many
    await mirror._probe(replica)
    assert mirror.max_batch_pages == BATCH // 2  # what the batcher cuts to from now on
    mirror.detach()


@pytest.mark.parametrize(
    "steps",
    [
        # the first copy in placement order misses a write, and is back when the frontend restarts
        ["fail 0", "write", "restore 0"],
        # the only copy with the write is given up for a stand-in, then answers again
        ["fail 1", "write", "fail 0", "restore 1", "settle", "stand_in", "restore 0"],
    ],
)
def test_a_restarted_frontend_follows_the_copy_with_every_write(steps: list[str]) -> None:
    machine = MirrorMachine()
    try:
        for step in steps:
            name, _, arg = step.partition(" ")
            if name == "write":
                machine.write(first=0, count=1, discard=False)
            elif arg:
                getattr(machine, name)(int(arg))
            else:
                getattr(machine, name)()
        machine.restart()
        machine.replicas_hold_what_they_claim()
        machine.read(first=0, count=1)
        assert machine.mirror.replicas[0].state is State.UP or machine.mirror.replicas[1].state is State.UP
    finally:
        machine.teardown()


def state(replica: Replica) -> State:
    """The replica's state now (a call, so the type checker does not carry it across awaits)."""
    return replica.state


def _generation(server: FakeServer) -> int:
    stored = server.pages["m"].get(SLOTS)
    return int(GENERATION.unpack_from(stored)[1]) if stored else 0


async def _mirror(
    servers: list[FakeServer], options: MirrorOptions | None = None, spares: Sequence[FakeServer] = ()
) -> MirroredArea:
    """Copies in step at generation 1, each an area that existed."""
    replicas = []
    for server in servers:
        server.pages.setdefault("m", {})[SLOTS] = GENERATION.pack(MAGIC, 1) + bytes(PS - GENERATION.size)
        area = cast(Any, FakeArea(server, "m", False))
        replica = Replica(server.name, cast(Any, FakeClient(server)), area, bytearray(SLOTS), State.UP)
        replica.generation = 1
        replicas.append(replica)
    others = [(s.name, cast(Any, FakeClient(s))) for s in spares]
    options = options or MirrorOptions()
    return MirroredArea("m", (SLOTS + 1) * PS, replicas, spares=others, pool_pages=16, options=options)


async def _restarted(servers: list[FakeServer]) -> MirroredArea:
    """A new frontend's mirror, attached as the fleet attaches it (tests/client/test_fleet.py)."""
    replicas = []
    for server in servers:
        area = cast(Any, await FakeClient(server).swapon("m", (SLOTS + 1) * PS))
        replicas.append(Replica(server.name, cast(Any, FakeClient(server)), area, bytearray(SLOTS), State.UP))
    mirror = MirroredArea("m", (SLOTS + 1) * PS, replicas, pool_pages=16)
    await mirror.read_generations()
    return mirror


async def test_a_generation_page_that_landed_unanswered_counts_as_held() -> None:
    # B (first in placement order) is brought up to date and given the generation; the page
    # lands, then B's server dies before it answers. A write B misses must still move A past
    # B's page, or a restart would follow B and lose the write.
    b, a = FakeServer("b"), FakeServer("a")
    mirror = await _mirror([b, a])
    rb, _ = mirror.replicas
    del b.pages["m"][SLOTS]  # B was rebuilt from empty: its page holds no generation yet
    rb.generation = 0
    rb.mark([(0, 1)])
    mirror._set(rb, State.SYNCING)
    await _copy_all(mirror)
    b.lag = 2
    mirror._set(rb, State.UP)
    caught_up = asyncio.ensure_future(mirror._caught_up(rb))
    while _generation(b) != mirror.generation:  # landed; the answer is on its way back
        await asyncio.sleep(0)
    write = asyncio.ensure_future(mirror.write_batch(range(7, 8), [memoryview(page(42))]))
    await asyncio.sleep(0)
    b.up = False
    await write  # acknowledged by A alone
    await caught_up
    assert _generation(a) > _generation(b)
    mirror.detach()
    b.up = True
    restarted = await _restarted([b, a])
    buf = bytearray(PS)
    await restarted.read_batch(range(7, 8), [memoryview(buf)])
    assert buf == page(42)
    restarted.detach()


async def test_a_bump_that_landed_unanswered_is_not_taken_for_a_copy_ahead() -> None:
    # B misses a write, so A's page takes the next generation -- which lands, but A's answer
    # is lost and the write fails. When both answer again, A (which has every write) stays in
    # step and moves past B; only B, behind on slot 3, syncs.
    a, b = FakeServer("a"), FakeServer("b")
    mirror = await _mirror([a, b])
    ra, rb = mirror.replicas
    a.lag, b.up = 2, False
    write = asyncio.ensure_future(mirror.write_batch(range(3, 4), [memoryview(page(9))]))
    while _generation(a) == 1:
        await asyncio.sleep(0)
    a.mute = True
    with pytest.raises(ConnectionLost):
        await write
    a.mute, b.up = False, True
    for replica in (rb, ra):
        await mirror._probe(replica)
    assert ra.state is State.UP and not ra.dirty_count
    assert rb.state is State.SYNCING and rb.dirty_count == 1
    assert mirror.generation == _generation(a) > 2 > _generation(b)
    buf = bytearray(2 * PS)
    await mirror.read_batch(range(3, 5), [memoryview(buf)])
    assert buf[:PS] == page(9)
    mirror.detach()


async def test_a_copy_brought_up_to_date_by_writes_alone_is_in_step() -> None:
    # B is behind on two slots, and the guest rewrites both before a copier gets to them:
    # B must still be taken as in step, and carry the area alone once A is lost.
    a, b = FakeServer("a"), FakeServer("b")
    mirror = await _mirror([a, b], MirrorOptions(probe_every=0.01, resync_rate=PS, resync_workers=1))
    _, rb = mirror.replicas
    b.up = False
    for slot in (3, 9):
        await mirror.write_batch(range(slot, slot + 1), [memoryview(page(slot))])
    b.up = True
    await mirror._probe(rb)
    assert rb.state is State.SYNCING and rb.dirty_count == 2
    mirror._paced_until = time.monotonic() + 0.3  # the copier waits its turn
    mirror.start()
    for slot in (3, 9):
        await mirror.write_batch(range(slot, slot + 1), [memoryview(page(slot + 1))])
    async with asyncio.timeout(5):
        while state(rb) is not State.UP:
            await asyncio.sleep(0.01)
    a.up = False
    await mirror.write_batch(range(5, 6), [memoryview(page(5))])
    await mirror.close()
    mirror.detach()


async def test_a_copy_that_misses_a_write_while_up_is_synced() -> None:
    # A write's answer from B arrives after B was lost and re-attached with nothing to copy:
    # B has missed it, so it is synced again, not left up and behind.
    a, b = FakeServer("a"), FakeServer("b")
    mirror = await _mirror([a, b])
    _, rb = mirror.replicas
    b.lag = 6
    write = asyncio.ensure_future(mirror.write_batch(range(3, 4), [memoryview(page(7))]))
    await asyncio.sleep(0)
    mirror._lost(rb, ConnectionLost("a read from b failed"), rb.epoch)
    await mirror._probe(rb)
    assert state(rb) is State.UP
    await write
    assert state(rb) is State.SYNCING and rb.dirty[3] == 1
    assert mirror._claim() == (rb, 3, 4)
    mirror.detach()


async def test_slots_past_the_mirror_are_refused() -> None:
    a, b = FakeServer("a"), FakeServer("b")
    mirror = await _mirror([a, b])
    generation = _generation(a)
    for slots in (range(SLOTS, SLOTS + 1), [SLOTS - 1, SLOTS + 3], range(-1, 1)):
        with pytest.raises(InvalidRequest, match="outside the mirror"):
            await mirror.write_batch(slots, [memoryview(page(1) * len(slots))])
        with pytest.raises(InvalidRequest, match="outside the mirror"):
            await mirror.read_batch(slots, [memoryview(bytearray(len(slots) * PS))])
    assert _generation(a) == _generation(b) == generation  # the generation page is the mirror's own
    assert all(len(r.dirty) == SLOTS for r in mirror.replicas)
    mirror.detach()


async def test_trimming_a_copy_keeps_the_batch_limit_the_buffers_fit() -> None:
    servers = [FakeServer(n) for n in "abc"]
    replicas = []
    for server, batch in zip(servers, (BATCH, BATCH, BATCH // 4), strict=True):
        server.pages["m"] = {}
        area = FakeArea(server, "m", False)
        area.max_batch_pages = batch
        replicas.append(
            Replica(server.name, cast(Any, FakeClient(server)), cast(Any, area), bytearray(SLOTS))
        )
    for replica in replicas:
        replica.state = State.UP
    mirror = MirroredArea("m", (SLOTS + 1) * PS, replicas, pool_pages=16)
    await mirror.read_generations(keep=2)  # c, with the smallest batches, is left out
    assert len(mirror.replicas) == 2
    assert mirror.max_batch_pages * PS <= min(len(buf) for buf in mirror._buffers)
    mirror.detach()


async def test_a_copy_back_whose_page_cannot_be_read_stays_down() -> None:
    # B was sent the current generation, which never landed: its page is older. Back, but
    # with its page unreadable, it cannot be told apart from a copy ahead, so it stays down;
    # once the page reads, B comes back in step and takes the generation for real.
    a, b = FakeServer("a"), FakeServer("b")
    mirror = await _mirror([a, b])
    _, rb = mirror.replicas
    del b.pages["m"][SLOTS]
    rb.confirmed = None
    mirror._lost(rb, ConnectionLost("b: the page write timed out"), rb.epoch)
    b.unreadable = True
    await mirror._probe(rb)
    assert state(rb) is State.DOWN
    b.unreadable = False
    await mirror._probe(rb)
    assert state(rb) is State.UP and _generation(b) == mirror.generation == _generation(a)
    mirror.detach()


async def test_a_server_given_up_and_taken_back_is_not_called_ahead(caplog: pytest.LogCaptureFixture) -> None:
    # B is given up for C, C in turn for B: B's page holds what this frontend wrote there,
    # which is no sign of a copy that was ahead of the truth.
    a, b, c = FakeServer("a"), FakeServer("b"), FakeServer("c")
    mirror = await _mirror([a, b], MirrorOptions(probe_every=0.01), spares=[c])
    _, rb = mirror.replicas
    mirror._bump_wanted = True
    await mirror._next_generation()  # both at 2: above what the mirror started from
    b.up = False
    await mirror.write_batch(range(3, 4), [memoryview(page(3))])  # B misses it: A moves to 3
    mirror._replace(rb)
    assert rb.server == "c"
    c.up = False
    mirror._replace(rb)
    assert rb.server == "b"
    b.up = True
    await mirror._probe(rb)
    assert state(rb) is State.SYNCING and rb.dirty_count == SLOTS
    assert not [r for r in caplog.records if "ahead" in r.getMessage()]
    mirror.detach()


async def test_a_cancelled_write_leaves_its_slots_on_the_copy_in_step() -> None:
    # A (first in placement order) is being rebuilt and is behind on slot 3; a write to slot 3
    # is cancelled on its way. The copies may now differ there: B, in step, is the one kept.
    a, b = FakeServer("a"), FakeServer("b")
    mirror = await _mirror([a, b])
    ra, rb = mirror.replicas
    ra.mark([(3, 4)])
    mirror._set(ra, State.SYNCING)
    a.lag = b.lag = 4
    write = asyncio.ensure_future(mirror.write_batch(range(3, 4), [memoryview(page(5))]))
    await asyncio.sleep(0)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert ra.dirty[3] == 1 and rb.dirty[3] == 0 and state(rb) is State.UP
    a.lag = b.lag = 0
    buf = bytearray(PS)
    await mirror.read_batch(range(3, 4), [memoryview(buf)])  # from B
    assert buf in (page(5), bytes(PS))
    mirror.detach()
