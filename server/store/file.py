"""Areas as preallocated files, so they survive a restart of the server.

Layout under the root (names are hex-encoded: no input ever becomes a path):

    <hex(owner)>/                 0700, one per principal
        <hex(name)>.data          0600, size_bytes, posix_fallocate'd at swapon
        <hex(name)>.map           0600, one byte per slot (1 = holds data), fallocate'd
        <hex(name)>.meta          0600, JSON {owner, name, size_bytes, page_size}

The .meta file is written last (write, fsync, rename): an area exists if and
only if its .meta does, so a creation cut short leaves files that the next
start removes. Pages are written with pwrite and not fsync'd: they survive a
crash of the server process (the page cache keeps them), not of the host --
swap does not outlive its host's memory either.

What a crash of the host took is not known, so the store says so rather than
serve it: `.state` at the root records the boot the server runs in and
whether it stopped cleanly (every file synced). An area found after an
unclean stop in an earlier boot is *suspect*: the next SwapOn of it starts it
afresh (empty, `created`), as if it had been lost -- which it may have been,
in part. Suspects are kept in `.state` until then, across restarts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from netswap.common.limits import NAME_PATTERN, PAGE_SIZE
from netswap.common.samepages import SamePages, page_of
from netswap.server.errors import Exhausted, FailedPrecondition
from netswap.server.slots import Slots
from netswap.server.store.base import AreaKey, Backing, SlotMap, layout

log = logging.getLogger(__name__)

META_FORMAT = 1


def _hex(text: str) -> str:
    return text.encode().hex()


def _unhex(text: str) -> str | None:
    try:
        return bytes.fromhex(text).decode()
    except ValueError:
        return None


def _reserve(path: Path, size: int) -> int:
    """Create `path` (must not exist) and allocate all of its blocks; return the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        path.unlink()
        raise
    return fd


class FileBacking:
    """An area's data file and slot map. The map lives in memory and is written through to
    its file, so no read on the event loop can fault on a page of it that the kernel dropped."""

    blocking = True  # writes, discards and uncached reads go to worker threads (AreaManager)

    def __init__(self, data_fd: int, map_fd: int, size_bytes: int, stored: bytearray) -> None:
        self._fd = data_fd
        self._map_fd = map_fd
        self._size = size_bytes
        self._map = SlotMap(stored)
        self._map_bytes = stored
        self._map_lock = threading.Lock()  # writes and discards update it (and the file) from worker threads
        self.trusted = True  # see the module docstring: False for a suspect area
        # Swap reads pages one at a time in no order: readahead would only
        # fetch pages nobody asked for -- and it fills the page cache with
        # large folios, which make every later 4 KiB write slow (WRITE_CHUNK).
        with contextlib.suppress(OSError):  # advice: a file system may not take it
            os.posix_fadvise(data_fd, 0, 0, os.POSIX_FADV_RANDOM)

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(
        self, slots: Slots, pages: memoryview, later: bool = False, same: SamePages | None = None
    ) -> None:
        # Always at once, `later` or not: acknowledged pages must survive a
        # crash of the server process (see the module docstring).
        if same is None:
            for index, first, count in slots.runs:
                self._store(first, count, [pages[index * PAGE_SIZE : (index + count) * PAGE_SIZE]])
            return
        # The pages themselves too (a mark lives in memory only): each run in one
        # gathered write, its same-filled pages from their words.
        run: list[memoryview] = []
        marks: list[tuple[int, bytes]] = []
        start = end = -1
        for first, count, at, word in layout(slots.runs, same):
            if first != end and run:
                self._store(start, end - start, run, marks)
                run, marks = [], []
            if not run:
                start = first
            if word:
                run.append(memoryview(page_of(word)))
                marks.append((first, word))
            else:
                run.append(pages[at * PAGE_SIZE : (at + count) * PAGE_SIZE])
            end = first + count
        self._store(start, end - start, run, marks)

    def _store(
        self, first: int, count: int, data: list[memoryview], marks: Sequence[tuple[int, bytes]] = ()
    ) -> None:
        pwrite_all(self._fd, data, first * PAGE_SIZE)
        # Data first, then the map: a crash in between leaves the slot
        # reading as its old contents, never as garbage. A rewrite of slots
        # that hold data already leaves the map file as it is.
        with self._map_lock:
            if self._map.holes(first, count):
                self._set_map(first, count, _ONES)
            self._map.mark(first, count)
            for slot, word in marks:
                self._map.mark_same(slot, word)

    def settle(self) -> None:
        pass  # nothing is ever pending (write)

    def read(
        self, slots: Slots, wait: bool = True, same: list[tuple[int, bytes]] | None = None
    ) -> list[bytes | memoryview] | None:
        if same is not None:
            return self._read_same(slots, wait, same)
        pieces: list[bytes | memoryview] = []
        scratch = 0  # where in _SCRATCH the next cached read goes (wait=False)
        for _, first, count in slots.runs:
            # Discarded slots keep their old bytes on disk (discard writes
            # nothing there); the map says to show zeros instead.
            start = 0
            for off in [*self._map.holes(first, count), count]:
                if off > start:  # stored pages [start, off) of the run
                    piece = self._pread(first + start, off - start, wait, scratch)
                    if piece is None:
                        return None
                    pieces.append(piece)
                    scratch += len(piece)
                if off < count:
                    pieces.append(_ZERO_PAGE)
                start = off + 1
        return pieces

    def _read_same(
        self, slots: Slots, wait: bool, same: list[tuple[int, bytes]]
    ) -> list[bytes | memoryview] | None:
        """read() for a reader that takes same-filled pages as words: a run is read whole (one
        system call, as any) and handed out around them."""
        pieces: list[bytes | memoryview] = []
        scratch = 0
        for index, first, count in slots.runs:
            marks = self._map.same(first, count)
            if len(marks) == count:
                same.extend((index + off, word) for off, word in marks)
                continue
            blob = self._pread(first, count, wait, scratch)
            if blob is None:
                return None
            scratch += len(blob)
            view = memoryview(blob)
            start = 0
            for off, word in marks:
                if off > start:
                    pieces.append(view[start * PAGE_SIZE : off * PAGE_SIZE])
                same.append((index + off, word))
                start = off + 1
            if start < count:
                pieces.append(view[start * PAGE_SIZE :])
        return pieces

    def _pread(self, first: int, count: int, wait: bool, scratch: int) -> bytes | memoryview | None:
        """Pages [first, first+count): read (wait), or from the page cache into _SCRATCH at
        `scratch` -- None if it does not hold them all."""
        size, offset = count * PAGE_SIZE, first * PAGE_SIZE
        if wait:
            return _pread_exact(self._fd, size, offset)
        return _pread_cached(self._fd, size, offset, scratch)

    def discard(self, slots: Slots) -> None:
        for _, first, count in slots.runs:
            with self._map_lock:  # the map file and the map in memory change together
                self._map.clear(first, count)
                self._set_map(first, count, _NULS)

    def _set_map(self, first: int, count: int, fill: memoryview) -> None:
        while count:
            step = min(count, len(fill))
            pwrite_all(self._map_fd, [fill[:step]], first)
            first, count = first + step, count - step

    def stored_pages(self) -> int:
        return self._map.stored

    def sync(self) -> None:
        os.fdatasync(self._fd)
        os.fdatasync(self._map_fd)

    def reset(self) -> None:
        """Forget every page (the map says none is stored); the reservation stays."""
        with self._map_lock:
            self._map.clear(0, len(self._map_bytes))
            os.ftruncate(self._map_fd, 0)
            os.posix_fallocate(self._map_fd, 0, len(self._map_bytes))

    def close(self) -> None:
        # Closed at most once, and never used after: a closed descriptor's number
        # may be handed to another area's file.
        fds, self._fd, self._map_fd = (self._fd, self._map_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


_ONES = memoryview(b"\x01" * 4096)
_NULS = memoryview(bytes(4096))

# At most this much per write(2). The kernel sizes page-cache folios by the
# write that creates them, and since Linux 6.x ext4 makes large ones; every
# later 4 KiB write into a large folio walks all of its block buffers. Swap
# rewrites pages one at a time, so small folios win (bench/pagecache.py, docs/performance.md).
WRITE_CHUNK = 16 * 1024


def pwrite_all(fd: int, bufs: Sequence[memoryview], offset: int) -> None:
    """Write the concatenation of `bufs` at `offset`, in gathered pieces of at most WRITE_CHUNK."""
    if len(bufs) == 1:  # one buffer, as most writes are
        buf = bufs[0]
        while buf:
            n = os.pwrite(fd, buf[:WRITE_CHUNK], offset)
            buf, offset = buf[n:], offset + n
        return
    group: list[memoryview] = []
    size = 0
    for whole in bufs:
        rest = whole
        while rest:
            take = rest[: WRITE_CHUNK - size]
            group.append(take)
            size += len(take)
            rest = rest[len(take) :]
            if size == WRITE_CHUNK:
                _pwritev_all(fd, group, offset)
                offset += size
                group, size = [], 0
    if group:
        _pwritev_all(fd, group, offset)


def _pwritev_all(fd: int, group: list[memoryview], offset: int) -> None:
    n = os.pwritev(fd, group, offset)
    if n < sum(map(len, group)):  # short: the rest one piece at a time
        pwrite_all(fd, [memoryview(b"".join(group))[n:]], offset + n)


_ZERO_PAGE = bytes(PAGE_SIZE)
# Cached reads on the event loop land here, not in a fresh (zero-filled)
# buffer: the caller joins the pieces into its reply before anything else runs.
_SCRATCH = bytearray()


def _pread_cached(fd: int, size: int, offset: int, at: int) -> memoryview | None:
    """`size` bytes at `offset` if the page cache holds all of them (into _SCRATCH at `at`), else None."""
    global _SCRATCH  # noqa: PLW0603 (one buffer for the whole process, grown to the largest read)
    if len(_SCRATCH) < at + size:
        _SCRATCH = bytearray(at + size)  # a new one: views of the old may still be alive
    view = memoryview(_SCRATCH)[at : at + size]
    try:
        got = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except OSError:  # EAGAIN: not all cached; EOPNOTSUPP: a file system that cannot tell (tmpfs)
        return None
    return view if got == size else None


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    pieces = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:  # the file is fallocate'd to its full size; EOF means it was truncated
            raise OSError(errno.EIO, f"short read at offset {offset + got}: area file truncated")
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


class StoreBusy(RuntimeError):
    """Another process holds the file store (a running server, or `netswap-server areas`)."""


def hold(root: str | os.PathLike[str]) -> int:
    """Take the store's lock for as long as the returned descriptor stays open: one process
    at a time may change a file store."""
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(Path(root) / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusy(f"the file store {root} is in use by another process (a running server?)") from None
    return fd


STATE = ".state"


def _boot_id() -> str:
    """This boot of the host ("" where the kernel does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _write_synced(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably: a temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + "-tmp") if path.suffix != ".meta" else path.with_suffix(".meta-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _rmdir_if_empty(owner_dir: Path) -> None:
    with contextlib.suppress(OSError):  # fails, as it should, while the principal has areas
        owner_dir.rmdir()


class FileStore:
    kind = "file"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._open: dict[AreaKey, FileBacking] = {}
        self._suspects: set[tuple[str, str]] = set()

    # -- what a crash of the host may have taken (see the module docstring) --------

    def _read_state(self) -> dict[str, object]:
        try:
            state = json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("%s unreadable (%s): every area is taken as suspect", self.root / STATE, e)
            return {"clean": False, "boot_id": None}
        return state if isinstance(state, dict) else {}

    def _write_state(self, clean: bool) -> None:
        state = {"boot_id": _boot_id(), "clean": clean, "suspect": sorted(list(s) for s in self._suspects)}
        try:
            _write_synced(self.root / STATE, json.dumps(state).encode())
        except OSError as e:  # e.g. a full disk: the store still works, crash detection may not
            log.error("cannot record the store's state in %s (%s): after a crash of the host its areas"
                      " may be trusted wrongly", self.root / STATE, e)  # fmt: skip

    def trust(self, key: AreaKey, backing: Backing) -> None:
        """Start a suspect area afresh (empty), and say so in the state file."""
        assert isinstance(backing, FileBacking)
        backing.reset()
        backing.trusted = True
        self._suspects.discard((_hex(key.owner), _hex(key.name)))
        self._write_state(clean=False)

    def _paths(self, key: AreaKey) -> tuple[Path, Path, Path]:
        base = self.root / _hex(key.owner) / _hex(key.name)
        return base.with_suffix(".data"), base.with_suffix(".map"), base.with_suffix(".meta")

    def existing(self) -> list[tuple[AreaKey, Backing]]:
        found: list[tuple[AreaKey, Backing]] = []
        for owner_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            owner = _unhex(owner_dir.name)
            if owner is None or not NAME_PATTERN.fullmatch(owner):
                log.warning("ignoring %s: not a netswap principal directory", owner_dir)
                continue
            metas = {p.stem for p in owner_dir.glob("*.meta")}
            for tmp in owner_dir.glob("*.meta-tmp"):
                tmp.unlink()
            for leftover in sorted(owner_dir.glob("*.data")) + sorted(owner_dir.glob("*.map")):
                if leftover.stem not in metas:
                    log.warning("removing %s: left by an interrupted swapon", leftover)
                    leftover.unlink()
            for stem in sorted(metas):
                area = self._load(owner, owner_dir / f"{stem}.meta")
                if area is not None:
                    found.append(area)
        state = self._read_state()
        listed = state.get("suspect")
        carried = (
            {(s[0], s[1]) for s in listed if isinstance(s, list) and len(s) == 2}
            if isinstance(listed, list)
            else set()
        )
        crashed = bool(state) and not state.get("clean") and state.get("boot_id") != _boot_id()
        for key, backing in found:
            assert isinstance(backing, FileBacking)
            self._open[key] = backing
            tag = (_hex(key.owner), _hex(key.name))
            if crashed or tag in carried:
                backing.trusted = False
                self._suspects.add(tag)
                log.warning(
                    "area %r of %r may have lost pages in a crash of the host (its last stop was not"
                    " clean, in an earlier boot): its next SwapOn starts it afresh, empty",
                    key.name, key.owner,
                )  # fmt: skip
        self._write_state(clean=False)
        return found

    def _load(self, owner: str, meta_path: Path) -> tuple[AreaKey, Backing] | None:
        # Anything unexpected is logged and left alone: never delete data we
        # do not understand.
        try:
            meta = json.loads(meta_path.read_text())
            key = AreaKey(owner=str(meta["owner"]), name=str(meta["name"]))
            size = int(meta["size_bytes"])
            ok = (
                meta.get("format") == META_FORMAT
                and meta.get("page_size") == PAGE_SIZE
                and key.owner == owner
                and NAME_PATTERN.fullmatch(key.name) is not None
                and meta_path.stem == _hex(key.name)
                and size > 0
                and size % PAGE_SIZE == 0
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("ignoring area %s: unreadable metadata (%s)", meta_path, e)
            return None
        if not ok:
            log.error("ignoring area %s: metadata does not match its location", meta_path)
            return None
        data_path, map_path, _ = self._paths(key)
        try:
            data_fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
            map_fd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            log.error("ignoring area %s: %s", meta_path, e)
            return None
        if os.fstat(data_fd).st_size != size or os.fstat(map_fd).st_size != size // PAGE_SIZE:
            log.error("ignoring area %s: files are not the recorded size %d", meta_path, size)
            os.close(data_fd)
            os.close(map_fd)
            return None
        stored = bytearray(_pread_exact(map_fd, size // PAGE_SIZE, 0))
        return key, FileBacking(data_fd, map_fd, size, stored)

    def create(self, key: AreaKey, size_bytes: int) -> Backing:
        data_path, map_path, meta_path = self._paths(key)
        data_path.parent.mkdir(mode=0o700, exist_ok=True)
        made: list[Path] = []
        fds: list[int] = []
        try:
            fds.append(_reserve(data_path, size_bytes))
            made.append(data_path)
            fds.append(_reserve(map_path, size_bytes // PAGE_SIZE))
            made.append(map_path)
            self._write_meta(key, size_bytes, meta_path)
            backing = FileBacking(fds[0], fds[1], size_bytes, bytearray(size_bytes // PAGE_SIZE))
            self._open[key] = backing
            return backing
        except BaseException as e:
            for fd in fds:
                os.close(fd)
            for path in [*made, meta_path.with_suffix(".meta-tmp")]:
                path.unlink(missing_ok=True)
            _rmdir_if_empty(data_path.parent)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Exhausted(f"not enough space in the file store for {size_bytes} bytes") from e
            if isinstance(e, FileExistsError):
                # Files the server ignored at startup (see its log) hold the name.
                raise FailedPrecondition(
                    f"area {key.name!r} has files on the server that could not be loaded;"
                    " the operator must repair or remove them"
                ) from e
            raise

    def _write_meta(self, key: AreaKey, size_bytes: int, meta_path: Path) -> None:
        meta = {
            "format": META_FORMAT,
            "owner": key.owner,
            "name": key.name,
            "size_bytes": size_bytes,
            "page_size": PAGE_SIZE,
        }
        _write_synced(meta_path, json.dumps(meta).encode())

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        data_path, map_path, meta_path = self._paths(key)
        # The .meta goes first: from then on the area no longer exists, even
        # if we die before the data file is gone. If it cannot go, nothing
        # has changed and the error propagates; after it, nothing may.
        meta_path.unlink(missing_ok=True)
        self._open.pop(key, None)
        try:
            backing.close()
        except OSError as e:
            log.warning("closing the files of %r of %r: %s", key.name, key.owner, e)
        for path in (data_path, map_path):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # harmless: removed as a leftover at the next start
                log.warning("could not remove %s: %s", path, e)
        _rmdir_if_empty(data_path.parent)
        if self._suspects:
            self._suspects.discard((_hex(key.owner), _hex(key.name)))
            self._write_state(clean=False)

    def close(self) -> None:
        """Sync every area's files, then record a clean stop (see the module docstring)."""
        for backing in list(self._open.values()):
            backing.sync()
        self._write_state(clean=True)
