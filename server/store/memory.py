"""Areas in this process's memory: allocated and faulted in at swapon, gone at exit."""

from __future__ import annotations

import mmap

from netswap.common.limits import PAGE_SIZE
from netswap.common.samepages import SamePages, repeat_into
from netswap.server.errors import Exhausted
from netswap.server.slots import Slots
from netswap.server.store.base import (
    AreaKey,
    Backing,
    SlotMap,
    drop,
    layout,
    lock,
    populate,
    split_same,
    zero_fill,
)


class MemoryBacking:
    blocking = False  # copies within memory: short enough for the event loop
    trusted = True  # gone with the process: never found after a crash

    def __init__(self, size_bytes: int, *, locked: bool = False) -> None:
        # An anonymous mapping, faulted in now: the pages are really allocated
        # at swapon (not lazily at the first SwapOut), so a later write cannot
        # be the thing that runs the host out of memory. Fresh pages are zeroed
        # by the kernel, so no previous area's data can show through.
        try:
            self._mm = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as e:
            raise Exhausted(f"cannot allocate {size_bytes} bytes of memory: {e.strerror}") from e
        try:
            populate(self._mm)
            if locked:
                self._lock(size_bytes)
        except OSError as e:
            self._mm.close()
            raise Exhausted(f"cannot fault in {size_bytes} bytes of memory: {e.strerror}") from e
        except BaseException:
            self._mm.close()
            raise
        self._data = memoryview(self._mm)
        self._map = SlotMap(bytearray(size_bytes // PAGE_SIZE))
        self._size = size_bytes
        self._later: tuple[Slots, memoryview, SamePages | None] | None = None  # see write()

    def _lock(self, size_bytes: int) -> None:
        """mlock the area so the server's host can never swap the swapped-out pages."""
        try:
            lock(self._mm)
        except OSError as e:
            raise Exhausted(
                f"cannot lock {size_bytes} bytes of memory ({e.strerror}): the server's"
                " RLIMIT_MEMLOCK or CAP_IPC_LOCK does not allow it"
            ) from e

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(
        self, slots: Slots, pages: memoryview, later: bool = False, same: SamePages | None = None
    ) -> None:
        if self._later is not None:  # writes land in the order they were taken
            self.settle()
        if later:
            # Kept, not copied: this area dies with the process, so a write
            # acknowledged before its copy is one no client can tell from any
            # other -- every read, write and discard here settles it first.
            self._later = (slots, pages, same)
            return
        self._copy(slots, pages, same)

    def _copy(self, slots: Slots, pages: memoryview, same: SamePages | None) -> None:
        data = self._data
        if same is None:
            for index, first, count in slots.runs:
                data[first * PAGE_SIZE : (first + count) * PAGE_SIZE] = pages[
                    index * PAGE_SIZE : (index + count) * PAGE_SIZE
                ]
                self._map.mark(first, count)
            return
        for first, count, at, word in layout(slots.runs, same):
            page = data[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
            if word:  # the page itself too: a reader that does not ask for words reads it
                repeat_into(page, word)
                self._map.mark_same(first, word)
            else:
                page[:] = pages[at * PAGE_SIZE : (at + count) * PAGE_SIZE]
                self._map.mark(first, count)

    def settle(self) -> None:
        if self._later is not None:
            self._copy(*self._later)
            # Only once copied: were a copy ever to fail, every later call on
            # this area would fail with it -- never read what it left out.
            self._later = None

    def read(
        self, slots: Slots, wait: bool = True, same: list[tuple[int, bytes]] | None = None
    ) -> list[bytes | memoryview]:
        # Views: the reply encoder's join is the only copy. Discard zeroes the
        # memory itself, so reads need not consult the map -- unless they take
        # same-filled pages as words.
        if self._later is not None:
            self.settle()
        data = self._data
        if same is None:
            return [data[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for _, first, count in slots.runs]
        return split_same(slots, self._map, data, same)

    def discard(self, slots: Slots) -> None:
        self.settle()
        for _, first, count in slots.runs:
            zero_fill(self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE])
            self._map.clear(first, count)

    def stored_pages(self) -> int:
        return self._map.stored

    def close(self) -> None:
        self._later = None  # the area is gone: nothing left to copy into
        self._data.release()
        drop(self._mm)
        self._mm.close()


class MemoryStore:
    kind = "memory"

    def __init__(self, *, lock: bool = False) -> None:
        self.lock = lock  # mlock every area (--mlock)

    def existing(self) -> list[tuple[AreaKey, Backing]]:
        return []

    def create(self, key: AreaKey, size_bytes: int) -> Backing:
        return MemoryBacking(size_bytes, locked=self.lock)

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        backing.close()

    def trust(self, key: AreaKey, backing: Backing) -> None:
        pass  # (every area is)

    def close(self) -> None:
        pass
