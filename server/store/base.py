"""The store interface and the slot bookkeeping both stores share."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from netswap.common.limits import PAGE_SIZE
from netswap.common.samepages import ZERO_WORD, SamePages
from netswap.server.slots import Piece, Slots


@dataclass(frozen=True, order=True)
class AreaKey:
    owner: str  # the principal that made the area
    name: str


class Backing(Protocol):
    """The storage of one area, reserved in full when it was made.

    Slots arrive checked (AreaManager): in range, no slot twice, as many pages
    as slots. A store that may wait for a disk says so (`blocking`); the
    manager then runs its writes, discards and uncached reads in worker
    threads, so they must be safe to run beside each other and beside reads
    on the event loop.
    """

    blocking: bool
    trusted: bool  # False: it may have lost pages in a crash (Store.trust starts it afresh)

    @property
    def size_bytes(self) -> int: ...

    def write(
        self, slots: Slots, pages: memoryview, later: bool = False, same: SamePages | None = None
    ) -> None:
        """Store the pages of `slots` (the blob holds them in order; with `same`, all but the
        same-filled pages it lists, which are stored as their words and marked: see SlotMap).

        With `later` the store may keep `pages` (which the caller must not
        change) and copy them at settle() or its next read, write or discard:
        a store whose contents die with its process anyway (memory) can so
        take the copy off a request's round trip, and no client can tell.
        A store that keeps acknowledged pages across a crash of the process
        (file) writes at once.
        """

    def settle(self) -> None:
        """Finish a write taken `later`, if one is pending."""

    def read(
        self, slots: Slots, wait: bool = True, same: list[tuple[int, bytes]] | None = None
    ) -> list[bytes | memoryview] | None:
        """The pages of `slots` in order, as pieces to concatenate; never-written/discarded slots
        read as zeros. Pieces may be views into the store, valid until its next call: join
        them at once (the reply encoders do -- one copy, into the message). With wait=False,
        None where the read would have to wait for a disk. With a list `same`, pages that
        read as a same-filled page (zeros included) are left out of the pieces and appended
        to it as (index among the slots, word)."""

    def discard(self, slots: Slots) -> None:
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
        """Reserve everything the area will need, or raise Exhausted leaving nothing behind.
        Runs in a worker thread."""

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        """Close the area and free its storage. Runs in a worker thread. Raises only if
        nothing has changed (the area is then as it was)."""

    def trust(self, key: AreaKey, backing: Backing) -> None:
        """Start an area that is not `trusted` afresh: empty, its reservation kept. Runs in a
        worker thread."""

    def close(self) -> None: ...


class SlotMap:
    """One byte per slot: 0 = holds no data (reads as zeros), 1 = holds data, 2 = holds a
    same-filled page written as its word (swap.proto), kept in `words` unless it is zero.

    The 2s live in memory only (a file store writes 1 to its map file for them
    and stores the page itself): they let a SwapIn that asks answer with the
    word. Counts stored slots as it goes, so ListAreas and metrics scrapes cost
    O(1) rather than a scan of the map.
    """

    def __init__(self, buf: bytearray) -> None:
        self._buf = buf
        self.stored = buf.count(1)
        self.words: dict[int, bytes] = {}  # slot -> word of the 2s whose word is not zero

    def mark(self, first: int, count: int) -> int:
        """Slots [first, first+count) hold data now; how many did not before."""
        seg = self._buf[first : first + count]
        fresh: int = seg.count(0)
        if fresh < count and 2 in seg:
            self._forget(first, seg)
        self._fill(first, count, _ONES)
        self.stored += fresh
        return fresh

    def mark_same(self, slot: int, word: bytes) -> int:
        """`slot` holds the page that is `word` repeated; 1 if it held no data before."""
        fresh = int(self._buf[slot] == 0)
        self._buf[slot] = 2
        if word == ZERO_WORD:
            self.words.pop(slot, None)
        else:
            self.words[slot] = word
        self.stored += fresh
        return fresh

    def clear(self, first: int, count: int) -> None:
        seg = self._buf[first : first + count]
        if 2 in seg:
            self._forget(first, seg)
        self.stored -= count - seg.count(0)
        self._fill(first, count, _NULS)

    def _forget(self, first: int, seg: bytearray) -> None:
        for i, v in enumerate(seg):
            if v == 2:
                self.words.pop(first + i, None)

    def _fill(self, first: int, count: int, fill: memoryview) -> None:
        end = first + count
        while first < end:
            step = min(end - first, len(fill))
            self._buf[first : first + step] = fill[:step]
            first += step

    def holes(self, first: int, count: int) -> list[int]:
        """Offsets (from `first`) of the slots of the run that hold no data."""
        seg = self._buf[first : first + count]
        if 0 not in seg:
            return []
        return [i for i, v in enumerate(seg) if v == 0]

    def same(self, first: int, count: int) -> list[tuple[int, bytes]]:
        """(offset from `first`, word) of the slots of the run that read as a same-filled page:
        those that hold no data (zeros) and those marked 2."""
        seg = self._buf[first : first + count]
        if seg.count(1) == count:
            return []
        odd = seg.translate(_NOT_ONE)  # found by C, not by a Python loop over every slot
        words = self.words
        out: list[tuple[int, bytes]] = []
        i = odd.find(1)
        while i >= 0:
            out.append((i, words.get(first + i, ZERO_WORD) if seg[i] == 2 else ZERO_WORD))
            i = odd.find(1, i + 1)
        return out


_NOT_ONE = bytes(int(v != 1) for v in range(256))  # a translate() table: 1 for a slot not holding a page


def layout(runs: Sequence[Piece], same: SamePages) -> list[tuple[int, int, int, bytes]]:
    """A write's pages as (first slot, count, first page in the blob, word): runs from the
    blob (word b"") and same-filled pages (count 1, blob page -1, their word). `same`
    indexes the request's pages; the blob holds the others, in order."""
    out: list[tuple[int, int, int, bytes]] = []
    marks = list(same)
    k = skipped = 0  # next mark; same pages so far (blob index = request index - skipped)
    for index, first, count in runs:
        pos = 0
        while k < len(marks) and marks[k][0] < index + count:
            at, word = marks[k][0] - index, marks[k][1]
            if at > pos:
                out.append((first + pos, at - pos, index + pos - skipped, b""))
            out.append((first + at, 1, -1, word))
            skipped += 1
            k += 1
            pos = at + 1
        if pos < count:
            out.append((first + pos, count - pos, index + pos - skipped, b""))
    return out


def split_same(
    slots: Slots, slot_map: SlotMap, data: memoryview, same: list[tuple[int, bytes]]
) -> list[bytes | memoryview]:
    """A read of `slots` from `data` (an area's pages) that leaves out the pages reading as a
    same-filled page (see SlotMap.same) and appends them to `same` as (index, word)."""
    pieces: list[bytes | memoryview] = []
    for index, first, count in slots.runs:
        pos = 0
        for off, word in slot_map.same(first, count):
            if off > pos:
                pieces.append(data[(first + pos) * PAGE_SIZE : (first + off) * PAGE_SIZE])
            same.append((index + off, word))
            pos = off + 1
        if pos < count:
            pieces.append(data[(first + pos) * PAGE_SIZE : (first + count) * PAGE_SIZE])
    return pieces


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


# -- memory the GIL is not held for ---------------------------------------------------------
# mmap(MAP_POPULATE) faults gigabytes in while holding the GIL (Python 3.11's
# mmap module does not release it), which stops the event loop whatever thread
# calls it. Mapped lazily and populated through ctypes, which releases the GIL
# for the whole foreign call, the loop keeps serving meanwhile.

_MADV_DONTNEED = 4
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
# In steps: faulting in (or dropping) a range holds the process's mmap lock,
# and a thread that maps memory meanwhile -- the event loop's, allocating --
# waits for it. A step of 4 MiB holds it for a millisecond or two.
STEP = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def address_of(mm: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor  # only the address was needed; drop the buffer export
    return address


def populate(mm: mmap.mmap) -> None:
    """Fault in every page of a private anonymous mapping, without holding the GIL."""
    address, size = address_of(mm), len(mm)
    for offset in range(0, size, STEP):
        step = min(STEP, size - offset)
        if _libc.madvise(address + offset, step, _MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: an older kernel; anything else is a real failure
                raise OSError(err, os.strerror(err))
            ctypes.memset(address + offset, 0, step)  # touching the pages faults them in just as well


def drop(mm: mmap.mmap) -> None:
    """Give a mapping's pages back to the kernel in steps, so that unmapping it is quick."""
    address, size = address_of(mm), len(mm)
    for offset in range(0, size, STEP):
        _libc.madvise(address + offset, min(STEP, size - offset), _MADV_DONTNEED)


def lock(mm: mmap.mmap) -> None:
    """mlock the whole mapping, in steps (raises OSError with the kernel's reason)."""
    address, size = address_of(mm), len(mm)
    for offset in range(0, size, STEP):
        if _libc.mlock(address + offset, min(STEP, size - offset)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
