"""Keep freed memory in the heap, for processes that move page batches.

glibc gives every block over its mmap threshold (128 KiB until it adapts)
a fresh mapping and returns it on free, and trims the top of the heap back
to the kernel. A process handling 1 MiB messages then takes 256 page faults
for every message it builds or receives, which costs more than gRPC's whole
round trip for it. Fixing both thresholds keeps such blocks in the heap and
reuses them. The price is that the heap stays at its high-water mark; a
server gives back what a burst left behind with trim(). A server also keeps
to one arena: a thread's arena never gives back the free top of its heap
under this trim threshold, and malloc_trim() trims only the main arena's.

`netswap nbd` gets the same effect from environment variables at re-exec
(client/reserve.py), which also cover memory allocated before Python runs.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for the adaptive threshold
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: "2 GiB free at the top" never happens here


_LIBC = ctypes.CDLL(None)  # once: a CDLL made per call is a reference cycle for the GC


def keep_heap(one_arena: bool = False) -> bool:
    """Apply the thresholds (glibc only), and with `one_arena` share the main arena between
    threads (call it before any thread starts); False where there is no mallopt (e.g. musl)."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    if one_arena and not mallopt(_M_ARENA_MAX, 1):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_mallinfo2 = getattr(_LIBC, "mallinfo2", None)  # None before glibc 2.33, and on musl
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2
_malloc_trim = getattr(_LIBC, "malloc_trim", None)
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]


def free_in_heap() -> int | None:
    """Bytes the heap holds free (glibc's mallinfo2), or None where there is no such call."""
    if _mallinfo2 is None:
        return None
    info: _Mallinfo2 = _mallinfo2()
    return int(info.fordblks)


def trim(above: int) -> bool:
    """Give the heap's free pages back to the kernel if more than `above` bytes are free.

    keep_heap() keeps freed message buffers for reuse; after a burst that is
    more than the steady load needs, and the pages would stay resident for
    good. Call it now and then, in a worker thread: it walks the heap."""
    free = free_in_heap()
    if free is None or free <= above or _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))
