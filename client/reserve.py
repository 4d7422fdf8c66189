"""Reserve safety for the process that serves swap: lock it in memory and keep it off the OOM list.

The kernel swaps when memory is short; the process that carries the swap
traffic must then make progress without fresh memory. So, once everything it
needs is allocated and touched (page pool, receive buffers, gRPC channel):

- mlockall(MCL_CURRENT | MCL_FUTURE): what is mapped now, and whatever is
  mapped later (populated at once), stays resident -- none of it can itself be
  swapped out, nor need a page-in to make progress;
- prctl(PR_SET_IO_FLUSHER): the kernel treats us like a block-layer flusher
  (memory allocations avoid recursing into I/O, and the task is throttled
  less), Linux >= 5.6 with CAP_SYS_RESOURCE;
- SCHED_FIFO: the page allocator lets a realtime task take pages below the
  min watermark, where every other task's allocation stops and waits for
  reclaim -- which, for swap on our device, waits for us (CAP_SYS_NICE);
- oom_score_adj = -1000: the OOM killer never picks us.

PR_SET_IO_FLUSHER and the scheduling policy belong to one thread, and a
thread inherits them only when it is created: before_threads() applies them
while the process has a single thread, so gRPC's threads have them too.

Each step reports what it achieved; only a refused mlockall is an error
(unless the caller opted out), because without it the rest is moot.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from netswap.common import grpcenv, heap

log = logging.getLogger(__name__)

MCL_CURRENT = 1
MCL_FUTURE = 2
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
# The lowest realtime priority: enough for the allocator's reserve, and
# below any realtime task an operator runs on purpose.
SCHED_PRIORITY = 1

# Thread stacks are locked (and so resident) in full under MCL_FUTURE: gRPC's
# threads would each pin the default 8 MiB. netswap's own code runs shallow.
STACK_LIMIT = 1 << 20
# vm.min_free_kbytes below this leaves a realtime task (a quarter of the
# reserve) too little to send with while swap is the only way to free memory.
MIN_FREE_KBYTES = 16384
_REEXEC_MARK = "NETSWAP_RESERVE_REEXEC"


class ReserveError(RuntimeError):
    """Memory could not be locked; the message says why and what to change."""


@dataclass(frozen=True)
class ReserveReport:
    locked: bool
    locked_bytes: int
    io_flusher: bool
    realtime: bool
    oom_score_adj: int | None
    notes: tuple[str, ...]

    def summary(self) -> str:
        parts = [
            f"mlockall {'on' if self.locked else 'off'} ({self.locked_bytes >> 20} MiB locked)",
            f"IO_FLUSHER {'set' if self.io_flusher else 'not set'}",
            f"SCHED_FIFO {'on' if self.realtime else 'off'}",
            f"oom_score_adj {self.oom_score_adj if self.oom_score_adj is not None else 'unknown'}",
        ]
        return ", ".join(parts)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A `kB` field of /proc/PID/status (VmLck, VmRSS, VmHWM) in bytes; 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024
    return 0


# The allocator settings that keep a warmed-up process off the kernel's free
# list. By default glibc serves big blocks (a 1 MiB gRPC message) with mmap and
# hands them back with munmap, and Python's object allocator maps and unmaps
# arenas likewise -- every request would take fresh pages from the kernel
# (locked and faulted at once under MCL_FUTURE), exactly what must not happen
# when memory is short. With these, freed memory stays in the heap, locked,
# and the next request reuses it: after warm-up the footprint stops moving.
ALLOCATOR_ENV = {
    "PYTHONMALLOC": "malloc",  # Python objects from glibc's heap too, not private arenas
    "MALLOC_MMAP_THRESHOLD_": str(heap.MMAP_THRESHOLD),  # blocks below it come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # and the heap is never given back
    "MALLOC_ARENA_MAX": "2",  # few arenas: less memory reserved per thread
}


def reserve_safe_process_or_reexec(argv: list[str]) -> None:
    """Give the process 1 MiB thread stacks and a heap that never shrinks, re-executing once.

    glibc reads RLIMIT_STACK (for new threads' stacks) and its MALLOC_*
    settings only at program start, and Python reads PYTHONMALLOC only then,
    so applying them means starting again. Call before any thread exists.
    """
    if os.environ.get(_REEXEC_MARK):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft > STACK_LIMIT:
        resource.setrlimit(resource.RLIMIT_STACK, (STACK_LIMIT, hard))
    # gRPC's settings (grpcenv) ride along: `python -m netswap.client` loads
    # gRPC before any code of ours could set them.
    env = {**grpcenv.ENV, **os.environ, **ALLOCATOR_ENV, _REEXEC_MARK: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "netswap.client", *argv], env)  # noqa: S606 (ourselves again)


def lock_memory() -> int:
    """mlockall(MCL_CURRENT | MCL_FUTURE); returns bytes locked, raises ReserveError if refused."""
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
        need = status_bytes("VmRSS") >> 20
        raise ReserveError(
            f"mlockall failed ({errno.errorcode.get(err, err)}): RLIMIT_MEMLOCK is {limit} and this"
            f" process needs about {need} MiB locked. Raise the limit (systemd: LimitMEMLOCK=infinity;"
            " shell: ulimit -l unlimited), run with CAP_IPC_LOCK, or pass --no-mlock to run unlocked"
        )
    return status_bytes("VmLck")


def set_io_flusher() -> str | None:
    """PR_SET_IO_FLUSHER; None on success, else why not."""
    libc = _libc()
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return None
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return "PR_SET_IO_FLUSHER not supported by this kernel (needs Linux >= 5.6)"
    if err == errno.EPERM:
        return "PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE"
    return f"PR_SET_IO_FLUSHER failed: {os.strerror(err)}"


def io_flusher_set() -> bool:
    return bool(_libc().prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1)


def set_realtime() -> str | None:
    """SCHED_FIFO at SCHED_PRIORITY for the calling thread; None on success, else why not."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(SCHED_PRIORITY))
    except OSError as e:
        return (
            f"cannot set SCHED_FIFO: {e.strerror} (needs CAP_SYS_NICE or RLIMIT_RTPRIO >= {SCHED_PRIORITY})"
        )
    return None


def is_realtime() -> bool:
    return os.sched_getscheduler(0) == os.SCHED_FIFO


def before_threads(*, realtime: bool = True) -> None:
    """Apply the per-thread measures while this is the only thread, so every later one inherits them.

    What fails here is tried again, and reported, by make_reserve_safe.
    """
    set_io_flusher()
    if realtime:
        set_realtime()


def set_oom_score_adj(value: int = -1000) -> str | None:
    """Lower our OOM score; None on success, else why not."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(value))
    except OSError as e:
        return f"cannot set oom_score_adj to {value}: {e.strerror} (lowering it needs CAP_SYS_RESOURCE)"
    return None


def oom_score_adj() -> int | None:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return None


def check_min_free(path: Path = Path("/proc/sys/vm/min_free_kbytes")) -> str | None:
    """None if vm.min_free_kbytes leaves the frontend room to send with, else why not."""
    try:
        value = int(path.read_text())
    except (OSError, ValueError):
        return None
    if value >= MIN_FREE_KBYTES:
        return None
    return (
        f"vm.min_free_kbytes is {value}, below {MIN_FREE_KBYTES}: if this machine swaps onto"
        " netswap, its frontend may find no memory to send with (deploy/vm/90-netswap.conf)"
    )


def make_reserve_safe(*, mlock: bool = True, realtime: bool = True) -> ReserveReport:
    """Apply every measure (mlock and realtime optional); warn about what could not be done.

    The per-thread ones reach only this thread and those it starts from now
    on, unless before_threads() ran first.
    """
    notes = []
    if mlock:
        lock_memory()
    checks = (set_io_flusher(), set_realtime() if realtime else None, set_oom_score_adj(), check_min_free())
    for problem in checks:
        if problem:
            notes.append(problem)
            log.warning("%s", problem)
    return ReserveReport(
        locked=mlock,
        locked_bytes=status_bytes("VmLck"),
        io_flusher=io_flusher_set(),
        realtime=is_realtime(),
        oom_score_adj=oom_score_adj(),
        notes=tuple(notes),
    )
