"""Areas, handles and the rules around them: the core of the swap service.

Speaks Python (principal names, ints, buffers) and raises errors from
netswap.server.errors; the gRPC layer above translates. Every check on a
request happens here, before the store is touched.

Concurrency: everything here runs on the server's event loop, and nothing
that may take long does. Reserving and releasing an area (fallocate, faulting
in or unmapping gigabytes) runs in a control thread, one operation at a time
per principal, so one tenant's burst of SwapOns waits behind itself. A store
that may wait for a disk has its writes, discards and uncached reads run in
I/O threads, at most `io_share` at a time per principal; a memory store's
copies, and reads the page cache holds, stay on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from netswap.common.limits import NAME_PATTERN, PAGE_SIZE
from netswap.common.samepages import SamePages
from netswap.server.audit import AuditLog, outcome_of
from netswap.server.errors import Exhausted, InvalidArgument, NotFound, ServiceError, SizeMismatch
from netswap.server.fairshare import current_turn
from netswap.server.iothreads import IoThreads
from netswap.server.slots import Run, Scattered, Slots
from netswap.server.store import AreaKey, Backing, Store

log = logging.getLogger(__name__)

HANDLE_BYTES = 16  # 128 random bits
T = TypeVar("T")


@dataclass(eq=False)
class Area:
    key: AreaKey
    backing: Backing
    handle: bytes | None = None  # the one live handle; None until attached
    busy: int = 0  # operations of this area running in I/O threads
    drained: asyncio.Future[None] | None = field(default=None, repr=False)  # set when busy drops to 0

    @property
    def size_bytes(self) -> int:
        return self.backing.size_bytes

    @property
    def slot_count(self) -> int:
        return self.backing.size_bytes // PAGE_SIZE


@dataclass(frozen=True)
class Attachment:
    handle: bytes
    slot_count: int
    created: bool


@dataclass(frozen=True)
class AreaStats:
    name: str
    size_bytes: int
    pages_stored: int
    owner: str = ""  # set where the caller may see other principals' areas (the operator)


class AreaManager:
    def __init__(
        self,
        store: Store,
        *,
        capacity: int,
        max_area_size: int,
        max_batch_pages: int,
        quota_of: Callable[[str], int | None],
        max_areas_per_principal: int = 16,
        swapon_rate: float = 10.0,
        swapon_burst: int = 20,
        io_threads: int = 8,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.max_area_size = max_area_size
        self.max_batch_pages = max_batch_pages
        self.max_areas_per_principal = max_areas_per_principal
        self._quota_of = quota_of
        self._audit = audit or AuditLog()
        # SwapOn reserves gigabytes (fallocate, page faults): a token bucket per
        # principal keeps one caller from keeping the server busy doing that.
        self._swapon_rate = swapon_rate
        self._swapon_burst = swapon_burst
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)
        # New at every start: lets a client whose handle died tell a restart
        # from someone else having attached its area.
        self.server_id = secrets.token_bytes(HANDLE_BYTES)
        self._areas: dict[AreaKey, Area] = {}
        self._owned: dict[str, dict[str, Area]] = {}  # the same areas by owner, then name
        self._handles: dict[bytes, Area] = {}
        self._creating: dict[AreaKey, int] = {}  # reservations being made: counted against capacity
        self._unsettled: list[Backing] = []  # took a SwapOut `later` (see settle)
        self._control_locks: dict[str, asyncio.Lock] = {}  # one control operation per principal
        self._control = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="netswap-control", initializer=_yield_cpu
        )
        self._io = IoThreads(io_threads, "netswap-io")
        # A principal may fill at most half the I/O threads: the rest stay for everyone else.
        self._io_share = max(1, io_threads // 2)
        self._io_gates: dict[str, asyncio.Semaphore] = {}
        for key, backing in store.existing():
            self._add(Area(key, backing))

    # -- accounting (read by metrics at scrape time) --------------------------

    @property
    def reserved_bytes(self) -> int:
        return sum(a.size_bytes for a in list(self._areas.values())) + sum(list(self._creating.values()))

    def reserved_by(self, owner: str) -> int:
        return sum(a.size_bytes for a in list(self._owned.get(owner, {}).values()))

    def area_count(self) -> int:
        return len(self._areas)

    def stored_pages(self) -> int:
        return sum(a.backing.stored_pages() for a in list(self._areas.values()))

    def orphans(self, known: Callable[[str], bool]) -> list[AreaStats]:
        """Areas whose owner `known` does not name: nobody can attach them until a principal of
        that name is configured again -- and then that principal gets them."""
        return [
            AreaStats(a.key.name, a.size_bytes, a.backing.stored_pages(), owner=a.key.owner)
            for a in sorted(list(self._areas.values()), key=lambda a: a.key)
            if not known(a.key.owner)
        ]

    # -- control plane ----------------------------------------------------------

    async def swapon(self, principal: str, name: str, size_bytes: int) -> Attachment:
        try:
            self._check_swapon(principal, name, size_bytes)
        except ServiceError as e:
            self._audit.event(
                "swapon", principal=principal, area=name[:80], size_bytes=size_bytes, outcome=outcome_of(e)
            )
            raise
        # Shielded: a caller that gives up (deadline, disconnect) must not cut
        # a reservation in half. The attach finishes either way; an area made
        # for a caller who left is found by the next SwapOn of that name.
        attach = asyncio.ensure_future(self._attach(AreaKey(principal, name), size_bytes))
        attach.add_done_callback(_retrieve)
        return await asyncio.shield(attach)

    def _check_swapon(self, principal: str, name: str, size_bytes: int) -> None:
        if not NAME_PATTERN.fullmatch(name):
            shown = repr(name[:80]) + (f"... ({len(name)} characters)" if len(name) > 80 else "")
            raise InvalidArgument(f"area name {shown} must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if size_bytes <= 0 or size_bytes % PAGE_SIZE:
            raise InvalidArgument(f"size_bytes {size_bytes} must be a positive multiple of {PAGE_SIZE}")
        if size_bytes > self.max_area_size:
            raise InvalidArgument(
                f"size_bytes {size_bytes} exceeds the server's max area size {self.max_area_size}"
            )
        now = time.monotonic()
        tokens, at = self._buckets.get(principal, (float(self._swapon_burst), now))
        tokens = min(float(self._swapon_burst), tokens + (now - at) * self._swapon_rate)
        if tokens < 1:
            raise Exhausted(
                f"SwapOn rate limit: at most {self._swapon_rate:g} per second (bursts of"
                f" {self._swapon_burst}) per principal; retry later"
            )
        self._buckets[principal] = (tokens - 1, now)

    def _control_lock(self, principal: str) -> asyncio.Lock:
        lock = self._control_locks.get(principal)
        if lock is None:
            lock = self._control_locks[principal] = asyncio.Lock()
        return lock

    async def _attach(self, key: AreaKey, size_bytes: int) -> Attachment:
        try:
            async with self._control_lock(key.owner):
                attachment = await self._attach_locked(key, size_bytes)
        except Exception as e:  # refusals and failures (e.g. the disk) alike
            self._audit.event(
                "swapon", principal=key.owner, area=key.name, size_bytes=size_bytes, outcome=outcome_of(e)
            )
            raise
        self._audit.event(
            "swapon", principal=key.owner, area=key.name, size_bytes=size_bytes, outcome="ok",
            created=attachment.created,
        )  # fmt: skip
        return attachment

    async def _attach_locked(self, key: AreaKey, size_bytes: int) -> Attachment:
        area = self._areas.get(key)
        created = area is None
        if area is None:
            area = await self._create(key, size_bytes)
        elif area.size_bytes != size_bytes:
            raise SizeMismatch(
                f"area {key.name!r} exists with size_bytes {area.size_bytes}, not {size_bytes}"
            )
        # One live handle per area: re-attaching (e.g. a client that lost
        # its handle) takes the area over and the old handle stops working --
        # and nothing sent with it lands afterwards: what it has in I/O
        # threads finishes first (a fence, which the mirror relies on).
        if area.handle is not None:
            del self._handles[area.handle]
            area.handle = None
            await self._drained(area)
        if not area.backing.trusted:  # it may have lost pages in a crash: as good as lost
            await self._in_control(self.store.trust, key, area.backing)
            created = True
        area.handle = secrets.token_bytes(HANDLE_BYTES)
        self._handles[area.handle] = area
        return Attachment(area.handle, area.slot_count, created)

    async def _create(self, key: AreaKey, size_bytes: int) -> Area:
        owned = len(self._owned.get(key.owner, ()))
        if owned >= self.max_areas_per_principal:
            raise Exhausted(
                f"area limit: {owned} areas exist; the server allows {self.max_areas_per_principal} per principal"
            )
        quota = self._quota_of(key.owner)
        used = self.reserved_by(key.owner)
        if quota is not None and used + size_bytes > quota:
            raise Exhausted(f"quota exceeded: {used} bytes reserved + {size_bytes} requested > quota {quota}")
        if self.reserved_bytes + size_bytes > self.capacity:
            # No figures: the server-wide total would tell one principal about
            # the others' areas.
            raise Exhausted(f"server capacity exceeded: cannot reserve {size_bytes} more bytes")
        # Counted against capacity from now on, while other principals' SwapOns go on.
        self._creating[key] = size_bytes
        try:
            backing = await self._in_control(self.store.create, key, size_bytes)
        finally:
            del self._creating[key]
        area = Area(key, backing)
        self._add(area)
        return area

    async def swapoff(self, principal: str, handle: bytes) -> None:
        async with self._control_lock(principal):
            try:
                area = self.attached(principal, handle, "SwapOff")
                # Unreachable first, so that nothing starts on it; then wait
                # for what runs in I/O threads before the store lets it go.
                del self._handles[handle]
                area.handle = None
                await self._drained(area)
                self.settle()
                try:
                    await self._in_control(self.store.destroy, area.key, area.backing)
                except BaseException:  # the store could not: the area stays as it was
                    area.handle = handle
                    self._handles[handle] = area
                    raise
            except Exception as e:  # refusals and failures (e.g. the disk) alike
                self._audit.event("swapoff", principal=principal, area=None, outcome=outcome_of(e))
                raise
            self._remove(area)
            self._audit.event("swapoff", principal=principal, area=area.key.name, outcome="ok")

    async def destroy(self, key: AreaKey) -> None:
        """Destroy an area by name, attached or not (the operator's `areas destroy`)."""
        async with self._control_lock(key.owner):
            area = self._areas.get(key)
            if area is None:
                raise NotFound(f"no area {key.name!r} of principal {key.owner!r}")
            if area.handle is not None:
                del self._handles[area.handle]
                area.handle = None
            await self._drained(area)
            self.settle()
            await self._in_control(self.store.destroy, area.key, area.backing)
            self._remove(area)
            self._audit.event("destroy", principal=key.owner, area=key.name, outcome="ok")

    def list_areas(self, principal: str) -> list[AreaStats]:
        self.settle()  # count a SwapOut acknowledged a moment ago
        owned = self._owned.get(principal, {})
        return [AreaStats(name, a.size_bytes, a.backing.stored_pages()) for name, a in sorted(owned.items())]

    def _add(self, area: Area) -> None:
        self._areas[area.key] = area
        self._owned.setdefault(area.key.owner, {})[area.key.name] = area

    def _remove(self, area: Area) -> None:
        del self._areas[area.key]
        owned = self._owned[area.key.owner]
        del owned[area.key.name]
        if not owned:
            del self._owned[area.key.owner]

    async def _in_control(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._control, fn, *args)

    # -- data plane -------------------------------------------------------------

    def attached(self, principal: str, handle: bytes, op: str) -> Area:
        """The caller's area of `handle`: the one handle check of every operation on an area."""
        area = self._handles.get(handle)
        if area is not None and area.key.owner == principal:
            return area
        if not handle:
            raise InvalidArgument("handle is empty: call SwapOn first")
        if area is not None:
            # Someone holds another principal's handle: worth an audit line.
            self._audit.event(
                "authz_failure", principal=principal, method=op, owner=area.key.owner, area=area.key.name,
                outcome="handle of another principal's area",
            )  # fmt: skip
        # To the caller, another principal's handle looks exactly like an
        # unknown one: no existence oracle.
        raise NotFound("unknown handle (expired by SwapOff, re-attach, or a server restart)")

    async def swap_out(
        self,
        area: Area,
        slots: Run | Sequence[int],
        pages: memoryview,
        later: bool = False,
        same: SamePages | None = None,
    ) -> int:
        """Store `pages` at `slots`; the number of pages. With `later` a store may copy them at
        settle() -- call it soon, e.g. once the reply is on its way -- or at the next call
        touching the area, whichever is first (Backing.write); the caller must not change
        `pages` meanwhile. `same`: the same-filled pages that `pages` leaves out."""
        checked = self.checked(area, slots)
        sent = checked.count
        if same is not None:
            if same.index[-1] >= checked.count:
                raise InvalidArgument(f"same_index {same.index[-1]} past the request's {checked.count} slots")
            sent -= len(same)
        if len(pages) != sent * PAGE_SIZE:
            raise InvalidArgument(
                f"pages is {len(pages)} bytes; {checked.count} slots need exactly {checked.count * PAGE_SIZE}"
                if same is None
                else f"pages is {len(pages)} bytes; {sent} slots not sent as a word need exactly {sent * PAGE_SIZE}"
            )
        backing = area.backing
        if backing.blocking:
            await self._offload(area, backing.write, checked, pages, False, same)
            return checked.count
        backing.write(checked, pages, later, same)
        if later:
            self._unsettled.append(backing)
        return checked.count

    async def swap_in(
        self, area: Area, slots: Run | Sequence[int], same: list[tuple[int, bytes]] | None = None
    ) -> list[bytes | memoryview]:
        """The pages of `slots`, as pieces to join at once (see Backing.read); with a list
        `same`, those that read as a same-filled page go there instead."""
        checked = self.checked(area, slots)
        backing = area.backing
        pieces = backing.read(checked, False, same)
        if pieces is None:  # the disk must be read: not on the event loop
            if same is not None:
                same.clear()  # what the cached attempt found is found again
            pieces = await self._offload(area, backing.read, checked, True, same)
            assert pieces is not None
        return pieces

    async def discard(self, area: Area, slots: Run | Sequence[int]) -> int:
        checked = self.checked(area, slots)
        if area.backing.blocking:
            await self._offload(area, area.backing.discard, checked)
        else:
            area.backing.discard(checked)
        return checked.count

    def settle(self) -> None:
        """Finish every copy a swap_out took `later` and has not finished yet."""
        while self._unsettled:
            backing = self._unsettled.pop()
            try:
                backing.settle()
            except Exception:
                # Whoever settles may be another principal's request: it must
                # not fail for this. The write stays pending in its area, whose
                # own next call fails with it (INTERNAL), never reads around it.
                log.exception("could not finish an acknowledged SwapOut's copy")

    async def _offload(self, area: Area, fn: Callable[..., T], *args: object) -> T:
        """Run fn in an I/O thread, within the area's owner's share of them."""
        owner = area.key.owner
        handle = area.handle  # the one the request came with
        gate = self._io_gates.get(owner)
        if gate is None:
            gate = self._io_gates[owner] = asyncio.Semaphore(self._io_share)
        async with gate:
            if area.handle is None or area.handle != handle:  # swapped off or re-attached meanwhile
                raise NotFound("unknown handle (expired by SwapOff, re-attach, or a server restart)")
            area.busy += 1
            # Counted until the thread is done, even if this caller is cancelled first.
            work = self._io.call(partial(_idle, area), fn, *args)
            turn = current_turn.get()
            if turn is not None:  # the thread's time is not the loop's (fairshare.Turn)
                turn.pause()
            try:
                return await work
            finally:
                if turn is not None:
                    turn.resume()

    async def _drained(self, area: Area) -> None:
        if area.busy:
            if area.drained is None or area.drained.done():
                area.drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(area.drained)

    # -- checks -----------------------------------------------------------------

    def checked(self, area: Area, slots: Run | Sequence[int]) -> Slots:
        """`slots` checked against the area: a Run, or the listed slots as a Scattered
        (or as a Run, when they are one)."""
        if isinstance(slots, Run):
            first, n = slots.first, slots.count
            if n <= 0 or n > self.max_batch_pages:
                raise self._count_error(n)
            if first < 0 or first + n > area.slot_count:
                raise self._range_error(area, first if first < 0 else first + n - 1)
            return slots
        n = len(slots)
        if n == 0 or n > self.max_batch_pages:
            raise self._count_error(n)
        # A list of slots arrives as protobuf's repeated field, slow to walk
        # from Python: copied out of it once.
        listed = list(slots)
        first, last = listed[0], listed[-1]
        if last - first == n - 1 and (n == 1 or listed == list(range(first, last + 1))):  # at C speed
            if first < 0 or last >= area.slot_count:
                raise self._range_error(area, first if first < 0 else last)
            return Run(first, n)
        # (From the wire slots are unsigned; an in-process caller's negative
        # slot would index from the end.)
        bottom, top = min(listed), max(listed)
        if bottom < 0 or top >= area.slot_count:
            raise self._range_error(area, bottom if bottom < 0 else top)
        if len(set(listed)) != n:
            seen: set[int] = set()
            for slot in listed:
                if slot in seen:
                    raise InvalidArgument(f"slot {slot} appears more than once")
                seen.add(slot)
        return Scattered(listed)

    @staticmethod
    def _range_error(area: Area, slot: int) -> InvalidArgument:
        return InvalidArgument(f"slot {slot} out of range: slot_count is {area.slot_count}")

    def _count_error(self, n: int) -> InvalidArgument:
        if n == 0:
            return InvalidArgument("slots is empty and no run is given")
        return InvalidArgument(f"{n} slots exceed max_batch_pages {self.max_batch_pages}")

    async def close(self) -> None:
        for lock in list(self._control_locks.values()):  # let control operations in progress finish
            async with lock:
                pass
        for area in list(self._areas.values()):  # nothing new starts; what runs finishes
            area.handle = None
        self._handles.clear()
        for area in list(self._areas.values()):
            await self._drained(area)
        self.settle()
        # The store first (a file store syncs every area and records a clean stop), in a thread.
        await self._in_control(self.store.close)
        for area in self._areas.values():
            area.backing.close()
        self._areas.clear()
        self._owned.clear()
        self._control.shutdown(wait=False)
        self._io.shutdown()


def _yield_cpu() -> None:
    """Reserving gigabytes is CPU work (the kernel zeroes every page): on a busy machine it
    goes after the event loop's thread, not beside it."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _idle(area: Area) -> None:
    area.busy -= 1
    if not area.busy and area.drained is not None and not area.drained.done():
        area.drained.set_result(None)


def _retrieve(task: asyncio.Future[Attachment]) -> None:
    """Mark the outcome of an attach whose caller left as seen (no 'never retrieved' noise)."""
    if not task.cancelled():
        task.exception()
