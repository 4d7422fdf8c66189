"""Areas in this process's memory: allocated and faulted in at swapon, gone at exit."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

from netswap.common.limits import PAGE_SIZE
from netswap.server.errors import Exhausted
from netswap.server.store.base import AreaKey, Backing, SlotMap, blob_runs, runs, zero_fill


class MemoryBacking:
    def __init__(self, size_bytes: int) -> None:
        # An anonymous mapping, populated now: the pages are really allocated at
        # swapon (not lazily at the first SwapOut), so a later write cannot be
        # the thing that runs the host out of memory. Fresh pages are zeroed by
        # the kernel, so no previous area's data can show through.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        try:
            self._mm = mmap.mmap(-1, size_bytes, flags=flags)
        except OSError as e:
            raise Exhausted(f"cannot allocate {size_bytes} bytes of memory: {e.strerror}") from e
        self._data = memoryview(self._mm)
        self._map = SlotMap(bytearray(size_bytes // PAGE_SIZE))
        self._size = size_bytes

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(self, slots: Sequence[int], pages: memoryview) -> None:
        for first, count, src in blob_runs(slots, pages):
            self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE] = src
            self._map.mark(first, count)

    def read(self, slots: Sequence[int], out: memoryview) -> None:
        # Discard zeroes the memory itself, so reads need not consult the map.
        for first, count, dst in blob_runs(slots, out):
            dst[:] = self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE]

    def discard(self, slots: Sequence[int]) -> None:
        for _, first, count in runs(slots):
            zero_fill(self._data[first * PAGE_SIZE : (first + count) * PAGE_SIZE])
            self._map.clear(first, count)

    def stored_pages(self) -> int:
        return self._map.stored

    def close(self) -> None:
        self._data.release()
        self._mm.close()


class MemoryStore:
    kind = "memory"

    def existing(self) -> list[tuple[AreaKey, Backing]]:
        return []

    def create(self, key: AreaKey, size_bytes: int) -> Backing:
        return MemoryBacking(size_bytes)

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        backing.close()

    def close(self) -> None:
        pass
