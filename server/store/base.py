"""The store interface and the slot bookkeeping both stores share."""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from netswap.common.limits import PAGE_SIZE


@dataclass(frozen=True, order=True)
class AreaKey:
    owner: str  # the principal that made the area
    name: str


class Backing(Protocol):
    """The storage of one area, reserved in full when it was made."""

    @property
    def size_bytes(self) -> int: ...

    def write(self, slots: Sequence[int], pages: memoryview, later: bool = False) -> None:
        """Store pages[i*PAGE_SIZE:(i+1)*PAGE_SIZE] at slots[i].

        With `later` the store may keep `pages` (which the caller must not
        change) and copy them at settle() or its next read, write or discard:
        a store whose contents die with its process anyway (memory) can so
        take the copy off a request's round trip, and no client can tell.
        A store that keeps acknowledged pages across a crash of the process
        (file) writes at once.
        """

    def settle(self) -> None:
        """Finish a write taken `later`, if one is pending."""

    def read(self, slots: Sequence[int]) -> list[bytes | memoryview]:
        """The pages of `slots` in order, as pieces to concatenate; never-written/discarded slots
        read as zeros. Pieces may be views into the store, valid until its next write or
        discard: join them at once (the reply encoders do -- one copy, into the message)."""

    def discard(self, slots: Sequence[int]) -> None:
        """Make the slots read as zeros, keeping their reservation."""

    def stored_pages(self) -> int:
        """Slots holding data: written and not discarded since. Leaves out a write taken
        `later` and not settled yet: the metrics thread reads it, and must not copy."""

    def close(self) -> None: ...


class Store(Protocol):
    kind: str

    def existing(self) -> list[tuple[AreaKey, Backing]]:
        """Areas found at startup (file store: those a previous process left)."""

    def create(self, key: AreaKey, size_bytes: int) -> Backing:
        """Reserve everything the area will need, or raise Exhausted leaving nothing behind."""

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        """Close the area and free its storage."""

    def close(self) -> None: ...


def runs(slots: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Split slots into runs of consecutive ascending slots, in request order.

    Yields (index of the run's first page in the blob, first slot, page count),
    so each run is one contiguous piece of the blob and of the backing medium:
    one memory copy or one stretch of the file per run, never one piece per page.
    """
    n = len(slots)
    if isinstance(slots, range) and slots.step == 1:
        # One run, as a kernel's swap-out clusters and the NBD frontend's
        # coalesced batches mostly are (AreaManager hands those over as a range).
        if n:
            yield 0, slots.start, n
        return
    i = 0
    while i < n:
        first = slots[i]
        j = i + 1
        while j < n and slots[j] == first + (j - i):
            j += 1
        yield i, first, j - i
        i = j


def blob_runs(slots: Sequence[int], blob: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """runs(), each with its piece of the page blob: (first slot, page count, pages)."""
    for index, first, count in runs(slots):
        yield first, count, blob[index * PAGE_SIZE : (index + count) * PAGE_SIZE]


class SlotMap:
    """One byte per slot: 1 = holds data. Backed by a bytearray or a shared mmap.

    Counts stored slots incrementally so ListAreas and metrics scrapes cost
    O(1) rather than a scan of the map.
    """

    def __init__(self, buf: bytearray | mmap.mmap) -> None:
        self._buf = buf
        self.stored = buf[:].count(1)

    def _fill(self, first: int, count: int, fill: memoryview) -> int:
        """Set slots [first, first+count) to fill[0]; return how many already were."""
        already: int = self._buf[first : first + count].count(fill[0])
        end = first + count
        while first < end:
            step = min(end - first, len(fill))
            self._buf[first : first + step] = fill[:step]
            first += step
        return already

    def mark(self, first: int, count: int) -> None:
        if count <= len(_ONES):  # any run of one request (max_batch_pages <= 4096): in this frame
            end = first + count
            self.stored += count - self._buf[first:end].count(1)
            self._buf[first:end] = _ONES[:count]
            return
        self.stored += count - self._fill(first, count, _ONES)

    def clear(self, first: int, count: int) -> None:
        self.stored -= count - self._fill(first, count, _NULS)

    def full(self, first: int, count: int) -> bool:
        """Whether every slot of the run holds data."""
        return 0 not in self._buf[first : first + count]

    def empty_in(self, first: int, count: int) -> list[int]:
        """Offsets (from `first`) of slots in the run that hold no data."""
        seg = self._buf[first : first + count]
        if 0 not in seg:
            return []
        return [i for i, v in enumerate(seg) if v == 0]


# Shared fill sources, sliced through memoryviews so filling allocates nothing.
_ONES = memoryview(b"\x01" * 4096)
_NULS = memoryview(bytes(4096))
_ZEROS = memoryview(bytes(64 * PAGE_SIZE))


def zero_fill(out: memoryview) -> None:
    """Zero `out` (any length) without allocating."""
    pos, end = 0, len(out)
    while pos < end:
        step = min(end - pos, len(_ZEROS))
        out[pos : pos + step] = _ZEROS[:step]
        pos += step
