"""Areas, handles and the rules around them: the core of the swap service.

Speaks Python (principal names, ints, buffers) and raises errors from
netswap.server.errors; the gRPC layer above translates. Every check on a
request happens here, before the store is touched.

Concurrency: everything runs on the server's event loop. Data-plane calls
(swap_out/swap_in/discard) are synchronous -- page-cache or memory copies of at
most one batch -- so a call sees an area that cannot be swapped off under it.
Control-plane calls (swapon/swapoff) take one lock, because creating an area
(fallocate of gigabytes) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netswap.common.limits import NAME_PATTERN, PAGE_SIZE
from netswap.server.audit import AuditLog, outcome_of
from netswap.server.errors import Exhausted, InvalidArgument, NotFound, ServiceError, SizeMismatch
from netswap.server.store import AreaKey, Backing, Store

log = logging.getLogger(__name__)

HANDLE_BYTES = 16  # 128 random bits


@dataclass
class Area:
    key: AreaKey
    backing: Backing
    handle: bytes | None = None  # the one live handle; None until attached

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
        self._handles: dict[bytes, Area] = {}
        self._unsettled: list[Backing] = []  # took a SwapOut `later` (see settle)
        self._control = asyncio.Lock()
        for key, backing in store.existing():
            self._areas[key] = Area(key, backing)

    # -- accounting (read by metrics at scrape time) --------------------------

    @property
    def reserved_bytes(self) -> int:
        return sum(a.size_bytes for a in list(self._areas.values()))

    def reserved_by(self, owner: str) -> int:
        return sum(a.size_bytes for a in list(self._areas.values()) if a.key.owner == owner)

    def area_count(self) -> int:
        return len(self._areas)

    def stored_pages(self) -> int:
        return sum(a.backing.stored_pages() for a in list(self._areas.values()))

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

    async def _attach(self, key: AreaKey, size_bytes: int) -> Attachment:
        try:
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
        async with self._control:
            area = self._areas.get(key)
            created = area is None
            if area is None:
                area = await self._create(key, size_bytes)
            elif area.size_bytes != size_bytes:
                raise SizeMismatch(
                    f"area {key.name!r} exists with size_bytes {area.size_bytes}, not {size_bytes}"
                )
            # One live handle per area: re-attaching (e.g. a client that lost
            # its handle) takes the area over and the old handle stops working.
            if area.handle is not None:
                del self._handles[area.handle]
            area.handle = secrets.token_bytes(HANDLE_BYTES)
            self._handles[area.handle] = area
            return Attachment(area.handle, area.slot_count, created)

    async def _create(self, key: AreaKey, size_bytes: int) -> Area:
        owned = sum(1 for k in self._areas if k.owner == key.owner)
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
        # Reserving gigabytes (fallocate, or faulting in memory) takes a while;
        # keep the event loop serving data-plane calls meanwhile.
        backing = await asyncio.to_thread(self.store.create, key, size_bytes)
        area = Area(key, backing)
        self._areas[key] = area
        return area

    async def swapoff(self, principal: str, handle: bytes) -> None:
        async with self._control:
            try:
                area = self._attached(principal, handle, "SwapOff")
                # Destroy first: if the store cannot, the area stays as it was.
                self.store.destroy(area.key, area.backing)
            except Exception as e:  # refusals and failures (e.g. the disk) alike
                self._audit.event("swapoff", principal=principal, area=None, outcome=outcome_of(e))
                raise
            del self._handles[handle]
            del self._areas[area.key]
            self._audit.event("swapoff", principal=principal, area=area.key.name, outcome="ok")

    def list_areas(self, principal: str) -> list[AreaStats]:
        self.settle()  # count a SwapOut acknowledged a moment ago
        return [
            AreaStats(a.key.name, a.size_bytes, a.backing.stored_pages())
            for key, a in sorted(self._areas.items())
            if key.owner == principal
        ]

    # -- data plane -------------------------------------------------------------
    # Every page request passes here: the common case (our own handle, one run
    # of slots) is a few lines inline, each step costing a few us when the
    # CPU's caches are cold, as they are between two requests (README,
    # Performance); failures take calls aside to say what was wrong.

    def swap_out(
        self, principal: str, handle: bytes, slots: Sequence[int], pages: memoryview, later: bool = False
    ) -> None:
        """Store `pages` at `slots`. With `later` the store may copy them at settle() -- call
        it soon, e.g. once the reply is on its way -- or at the next call touching the
        area, whichever is first (Backing.write); the caller must not change `pages`."""
        area = self._handles.get(handle)
        if area is None or area.key.owner != principal:
            area = self._attached(principal, handle, "SwapOut")
        slots = self._checked_slots(area, slots)
        if len(pages) != len(slots) * PAGE_SIZE:
            raise InvalidArgument(
                f"pages is {len(pages)} bytes; {len(slots)} slots need exactly {len(slots) * PAGE_SIZE}"
            )
        area.backing.write(slots, pages, later)
        if later:
            self._unsettled.append(area.backing)

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

    def swap_in(self, principal: str, handle: bytes, slots: Sequence[int]) -> list[bytes | memoryview]:
        """The pages of `slots`, as pieces to join at once (see Backing.read)."""
        area = self._handles.get(handle)
        if area is None or area.key.owner != principal:
            area = self._attached(principal, handle, "SwapIn")
        return area.backing.read(self._checked_slots(area, slots))

    def discard(self, principal: str, handle: bytes, slots: Sequence[int]) -> None:
        area = self._attached(principal, handle, "Discard")
        area.backing.discard(self._checked_slots(area, slots))

    # -- checks -----------------------------------------------------------------

    def _attached(self, principal: str, handle: bytes, op: str) -> Area:
        if not handle:
            raise InvalidArgument("handle is empty: call SwapOn first")
        area = self._handles.get(handle)
        if area is not None and area.key.owner != principal:
            # Someone holds another principal's handle: worth an audit line.
            self._audit.event(
                "authz_failure", principal=principal, method=op, owner=area.key.owner, area=area.key.name,
                outcome="handle of another principal's area",
            )  # fmt: skip
            area = None
        # To the caller, another principal's handle looks exactly like an
        # unknown one: no existence oracle.
        if area is None:
            raise NotFound("unknown handle (expired by SwapOff, re-attach, or a server restart)")
        return area

    def _checked_slots(self, area: Area, slots: Sequence[int]) -> Sequence[int]:
        """`slots`, checked: as a range when they are one ascending run (the store then
        takes them as one piece without looking again), else as a list."""
        if type(slots) is range and slots.step == 1:  # a run (slots_of): checked in O(1)
            n = len(slots)
            if n == 0 or n > self.max_batch_pages:
                raise self._count_error(n)
            if slots.start < 0 or slots.stop > area.slot_count:
                raise self._range_error(area, slots.start if slots.start < 0 else slots.stop - 1)
            return slots
        if type(slots) is Misnamed:
            raise InvalidArgument(slots.why)
        # A list of slots arrives as protobuf's repeated field, slow to walk
        # from Python: copied out of it once.
        slots = list(slots)
        n = len(slots)
        if n == 0 or n > self.max_batch_pages:
            raise self._count_error(n)
        first, last = slots[0], slots[-1]
        if last - first == n - 1 and (n == 1 or slots == list(range(first, last + 1))):  # at C speed
            if first < 0 or last >= area.slot_count:
                raise self._range_error(area, first if first < 0 else last)
            return range(first, last + 1)
        # (From the wire slots are unsigned; an in-process caller's negative
        # slot would index from the end.)
        bottom, top = min(slots), max(slots)
        if bottom < 0 or top >= area.slot_count:
            raise self._range_error(area, bottom if bottom < 0 else top)
        if len(set(slots)) != n:
            seen: set[int] = set()
            for slot in slots:
                if slot in seen:
                    raise InvalidArgument(f"slot {slot} appears more than once")
                seen.add(slot)
        return slots

    @staticmethod
    def _range_error(area: Area, slot: int) -> InvalidArgument:
        return InvalidArgument(f"slot {slot} out of range: slot_count is {area.slot_count}")

    def _count_error(self, n: int) -> InvalidArgument:
        if n == 0:
            return InvalidArgument("slots is empty and no run is given")
        return InvalidArgument(f"{n} slots exceed max_batch_pages {self.max_batch_pages}")

    async def close(self) -> None:
        async with self._control:  # let a creation in progress finish first
            self._close()

    def _close(self) -> None:
        for area in self._areas.values():
            area.backing.close()
        self._areas.clear()
        self._handles.clear()
        self.store.close()


class Misnamed(list[int]):
    """No slots, and why: what slots_of gives for a request that names its slots wrongly. The
    manager refuses it where it refuses any bad slot -- after the handle check, so the
    caller of another principal's handle hears NOT_FOUND (and is audited) all the same."""

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why


def slots_of(listed: Sequence[int], run_start: int, run_count: int) -> Sequence[int]:
    """A request's slots from the two ways the wire names them (swap.proto): listed, or
    as a run -- returned as a range, which the checks and the stores take in O(1)."""
    if not run_count:
        if run_start:
            return Misnamed(f"run_start {run_start} without run_count: a run needs both")
        return listed
    if listed:
        return Misnamed("a request names its slots or a run (run_start, run_count), not both")
    return range(run_start, run_start + run_count)


def _retrieve(task: asyncio.Future[Attachment]) -> None:
    """Mark the outcome of an attach whose caller left as seen (no 'never retrieved' noise)."""
    if not task.cancelled():
        task.exception()
