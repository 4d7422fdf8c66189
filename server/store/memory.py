"""Areas in this process's memory: allocated and faulted in at swapon, gone at exit."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence

from netswap.common.limits import PAGE_SIZE
from netswap.server.errors import Exhausted
from netswap.server.store.base import AreaKey, Backing, SlotMap, blob_runs, runs, zero_fill


class MemoryBacking:
    def __init__(self, size_bytes: int, *, lock: bool = False) -> None:
        # An anonymous mapping, populated now: the pages are really allocated at
        # swapon (not lazily at the first SwapOut), so a later write cannot be
        # the thing that runs the host out of memory. Fresh pages are zeroed by
        # the kernel, so no previous area's data can show through.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        try:
            self._mm = mmap.mmap(-1, size_bytes, flags=flags)
        except OSError as e:
            raise Exhausted(f"cannot allocate {size_bytes} bytes of memory: {e.strerror}") from e
        if lock:
            self._lock(size_bytes)
        self._data = memoryview(self._mm)
        self._map = SlotMap(bytearray(size_bytes // PAGE_SIZE))
        self._size = size_bytes
        self._later: tuple[Sequence[int], memoryview] | None = None  # see write()

    def _lock(self, size_bytes: int) -> None:
        """mlock the area so the server's host can never swap the swapped-out pages."""
        anchor = ctypes.c_char.from_buffer(self._mm)
        address = ctypes.addressof(anchor)
        del anchor  # only the address was needed; drop the buffer export
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size_bytes)) != 0:
            err = ctypes.get_errno()
            self._mm.close()
            raise Exhausted(
                f"cannot lock {size_bytes} bytes of memory ({os.strerror(err)}): the server's"
                " RLIMIT_MEMLOCK or CAP_IPC_LOCK does not allow it"
            )

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(self, slots: Sequence[int], pages: memoryview, later: bool = False) -> None:
        if self._later is not None:  # writes land in the order they were taken
            self.settle()
        if later:
            # Kept, not copied: this area dies with the process, so a write
            # acknowledged before its copy is one no client can tell from any
            # other -- every read, write and discard here settles it first.
            self._later = (slots, pages)
            return
        self._copy(slots, pages)

    def _copy(self, slots: Sequence[int], pages: memoryview) -> None:
        if type(slots) is range and slots.step == 1:  # one run, as most requests are: no generators
            first, size = slots.start, len(slots) * PAGE_SIZE
            # The run's pages only, as blob_runs would give: never past its slots.
            self._data[first * PAGE_SIZE : first * PAGE_SIZE + size] = pages[:size]
            self._map.mark(first, len(slots))
            return
        for first, count, src in blob_runs(slots, pages):
            self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE] = src
            self._map.mark(first, count)

    def settle(self) -> None:
        if self._later is not None:
            self._copy(*self._later)
            # Only once copied: were a copy ever to fail, every later call on
            # this area would fail with it -- never read what it left out.
            self._later = None

    def read(self, slots: Sequence[int]) -> list[bytes | memoryview]:
        # Views: the reply encoder's join is the only copy. Discard zeroes the
        # memory itself, so reads need not consult the map.
        if self._later is not None:
            self.settle()
        if type(slots) is range and slots.step == 1:  # one run: as in write
            return [self._data[slots.start * PAGE_SIZE : slots.stop * PAGE_SIZE]]
        return [
            self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for _, first, count in runs(slots)
        ]

    def discard(self, slots: Sequence[int]) -> None:
        self.settle()
        for _, first, count in runs(slots):
            zero_fill(self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE])
            self._map.clear(first, count)

    def stored_pages(self) -> int:
        return self._map.stored

    def close(self) -> None:
        self._data.release()
        self._mm.close()
        self._later = None  # the area is gone: nothing left to copy into


class MemoryStore:
    kind = "memory"

    def __init__(self, *, lock: bool = False) -> None:
        self.lock = lock  # mlock every area (--mlock)

    def existing(self) -> list[tuple[AreaKey, Backing]]:
        return []

    def create(self, key: AreaKey, size_bytes: int) -> Backing:
        return MemoryBacking(size_bytes, lock=self.lock)

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        backing.close()

    def close(self) -> None:
        pass
