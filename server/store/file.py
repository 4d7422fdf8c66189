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
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from netswap.common.limits import NAME_PATTERN, PAGE_SIZE
from netswap.server.errors import Exhausted, FailedPrecondition
from netswap.server.store.base import AreaKey, Backing, SlotMap, blob_runs, runs

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
    def __init__(self, data_fd: int, map_fd: int, size_bytes: int) -> None:
        self._fd = data_fd
        self._map_fd = map_fd
        self._size = size_bytes
        # Swap reads pages one at a time in no order: readahead would only
        # fetch pages nobody asked for -- and it fills the page cache with
        # large folios, which make every later 4 KiB write slow (WRITE_CHUNK).
        # bench/pagecache.py, after cold 1 MiB reads: random page write ~20 -> ~2.5 us.
        with contextlib.suppress(OSError):  # advice: a file system may not take it
            os.posix_fadvise(data_fd, 0, 0, os.POSIX_FADV_RANDOM)
        # MAP_SHARED: map updates reach the page cache at once and survive
        # kill -9 like the data they describe. The map file is fallocate'd, so
        # touching it can never fault for lack of space (which would SIGBUS).
        self._map_mm = mmap.mmap(map_fd, size_bytes // PAGE_SIZE, mmap.MAP_SHARED)
        self._map = SlotMap(self._map_mm)

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(self, slots: Sequence[int], pages: memoryview, later: bool = False) -> None:
        # Always at once, `later` or not: acknowledged pages must survive a
        # crash of the server process (see the module docstring).
        if type(slots) is range and slots.step == 1:  # one run, as most requests are: no generators
            pwrite_all(self._fd, pages[: len(slots) * PAGE_SIZE], slots.start * PAGE_SIZE)
            self._map.mark(slots.start, len(slots))  # after the data, as below
            return
        for first, count, src in blob_runs(slots, pages):
            pwrite_all(self._fd, src, first * PAGE_SIZE)
            # Data first, then the map: a crash in between leaves the slot
            # reading as its old contents, never as garbage.
            self._map.mark(first, count)

    def settle(self) -> None:
        pass  # nothing is ever pending (write)

    def read(self, slots: Sequence[int]) -> list[bytes | memoryview]:
        # os.pread's bytes are the read's only buffer: no zeroed buffer filled
        # and then copied again into the reply.
        if type(slots) is range and slots.step == 1 and self._map.full(slots.start, len(slots)):
            # One run of stored pages, as most reads are: one pread, no generators.
            return [_pread_exact(self._fd, len(slots) * PAGE_SIZE, slots.start * PAGE_SIZE)]
        pieces: list[bytes | memoryview] = []
        for _, first, count in runs(slots):
            # Discarded slots keep their old bytes on disk (discard writes
            # nothing); the map says to show zeros instead.
            start = 0
            for off in [*self._map.empty_in(first, count), count]:
                if off > start:  # stored pages [start, off) of the run
                    pieces.append(
                        _pread_exact(self._fd, (off - start) * PAGE_SIZE, (first + start) * PAGE_SIZE)
                    )
                if off < count:
                    pieces.append(_ZERO_PAGE)
                start = off + 1
        return pieces

    def discard(self, slots: Sequence[int]) -> None:
        for _, first, count in runs(slots):
            self._map.clear(first, count)

    def stored_pages(self) -> int:
        return self._map.stored

    def close(self) -> None:
        self._map_mm.close()
        os.close(self._map_fd)
        os.close(self._fd)


# At most this much per write(2). The kernel sizes page-cache folios by the
# write that creates them; since Linux 6.x ext4 makes large folios, and every
# later 4 KiB write into one walks all of its block buffers. bench/pagecache.py
# on 6.18/ext4: a random 4 KiB page write costs 2.6-2.9 us in a file written
# in 16 KiB pieces and 9.9-11.8 us in one written in 1 MiB pieces, and the
# 16 KiB pieces showed no clear cost of their own (server CPU per page at 4k
# qd32: 56 -> 25 us). Swap rewrites pages one at a time, so small folios win.
WRITE_CHUNK = 16 * 1024


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of `buf` at `offset`, in pieces of at most WRITE_CHUNK."""
    while buf:
        n = os.pwrite(fd, buf[:WRITE_CHUNK], offset)
        buf, offset = buf[n:], offset + n


_ZERO_PAGE = bytes(PAGE_SIZE)


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


def _rmdir_if_empty(owner_dir: Path) -> None:
    with contextlib.suppress(OSError):  # fails, as it should, while the principal has areas
        owner_dir.rmdir()


class FileStore:
    kind = "file"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

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
        return key, FileBacking(data_fd, map_fd, size)

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
            return FileBacking(fds[0], fds[1], size_bytes)
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
        tmp = meta_path.with_suffix(".meta-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(meta).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, meta_path)
        dir_fd = os.open(meta_path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def destroy(self, key: AreaKey, backing: Backing) -> None:
        data_path, map_path, meta_path = self._paths(key)
        # The .meta goes first: from then on the area no longer exists, even
        # if we die before the data file is gone. If it cannot go, nothing
        # has changed and the error propagates.
        meta_path.unlink(missing_ok=True)
        backing.close()
        for path in (data_path, map_path):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # harmless: removed as a leftover at the next start
                log.warning("could not remove %s: %s", path, e)
        _rmdir_if_empty(data_path.parent)

    def close(self) -> None:
        pass
