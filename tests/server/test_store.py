"""Store level: one test body over both stores, plus the file store's on-disk rules."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from netswap.common.samepages import SamePages
from netswap.server.errors import Exhausted
from netswap.server.slots import Run, Scattered, Slots
from netswap.server.store import AreaKey, FileStore, MemoryStore, Store
from netswap.server.store.base import Backing
from tests.helpers import PS, pattern

KEY = AreaKey("alice", "vm1")


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else FileStore(tmp_path / "root")
    yield s
    s.close()


def S(slots: list[int] | range) -> Slots:
    """Slots as AreaManager hands them over: a range as a Run, a list as a Scattered."""
    return Run(slots.start, len(slots)) if isinstance(slots, range) else Scattered(list(slots))


def read(b: Backing, slots: list[int] | range) -> bytes:
    pieces = b.read(S(slots))
    assert pieces is not None
    return b"".join(pieces)


def test_runs_split_on_gaps_and_reversals() -> None:
    assert Scattered([4, 5, 6, 1, 2, 9, 8]).runs == ((0, 4, 3), (3, 1, 2), (5, 9, 1), (6, 8, 1))
    assert Scattered([]).runs == ()
    # one ascending run is one piece, as a Run is
    assert Run(7, 4).runs == Scattered([7, 8, 9, 10]).runs == ((0, 7, 4),)
    assert Scattered([9, 8, 7, 6]).runs == ((0, 9, 1), (1, 8, 1), (2, 7, 1), (3, 6, 1))


def test_write_read_discard(store: Store) -> None:
    b = store.create(KEY, 64 * PS)
    data = pattern(1, 5)
    slots = [3, 4, 5, 0, 63]
    b.write(S(slots), memoryview(data))
    assert read(b, slots) == data
    assert b.stored_pages() == 5
    b.discard(S([4, 0, 1]))  # 1 was never written: no change to the count
    assert b.stored_pages() == 3
    assert read(b, slots) == data[:PS] + bytes(PS) + data[2 * PS : 3 * PS] + bytes(PS) + data[4 * PS :]
    store.destroy(KEY, b)


def test_a_run_given_as_a_range_is_stored_and_read_as_its_slots_one_by_one(store: Store) -> None:
    # AreaManager hands one ascending run over as a range, which both stores
    # take on a path of their own: it must agree with the slot-by-slot one.
    b = store.create(KEY, 64 * PS)
    b.write(S(range(8, 16)), memoryview(pattern(1, 8)))
    assert b.stored_pages() == 8
    assert read(b, range(8, 16)) == pattern(1, 8) == read(b, list(range(8, 16)))
    b.write(S(range(12, 20)), memoryview(pattern(2, 8)))  # overlaps: 4 new slots
    assert b.stored_pages() == 12
    b.discard(S([13]))
    expected = pattern(1, 4) + pattern(2, 1) + bytes(PS) + pattern(2, 8)[2 * PS :]
    assert read(b, range(8, 20)) == expected  # one discarded slot: zeros there
    assert read(b, range(18, 24)) == pattern(2, 8)[6 * PS :] + bytes(4 * PS)  # runs past the data
    b.write(S(range(60, 64)), memoryview(pattern(3, 4)))  # up to the end of the area
    b.discard(S([63]))  # only the run's last slot empty
    assert read(b, range(60, 64)) == pattern(3, 3) + bytes(PS)
    b.discard(S([60]))  # and only its first
    assert read(b, range(60, 63)) == bytes(PS) + pattern(3, 3)[PS:]
    assert b.stored_pages() == 11 + 2
    b.write(S(range(30, 31)), memoryview(pattern(4, 2)))  # more pages than slots: the run's are taken
    assert read(b, range(30, 32)) == pattern(4, 1) + bytes(PS)
    assert b.stored_pages() == 11 + 2 + 1
    store.destroy(KEY, b)


def test_a_write_taken_later_is_what_every_next_call_sees(store: Store) -> None:
    # write(later=True) may leave the copy to settle() -- the memory store does,
    # so that PageStream answers a SwapOut first -- but whatever comes next on
    # the area sees the write: a read, a discard, another write.
    b = store.create(KEY, 64 * PS)
    b.write(S(range(0, 4)), memoryview(pattern(1, 4)), later=True)
    assert read(b, range(0, 4)) == pattern(1, 4)
    b.write(S([4]), memoryview(pattern(2, 1)), later=True)
    b.write(S([5]), memoryview(pattern(3, 1)), later=True)  # the write before it is not lost...
    b.write(S([5]), memoryview(pattern(4, 1)), later=True)  # ...and lands before it
    b.write(S(range(6, 8)), memoryview(pattern(5, 2)), later=True)
    b.discard(S([6]))  # discards what was written, not what comes after
    assert read(b, [4, 5, 6, 7]) == pattern(2, 1) + pattern(4, 1) + bytes(PS) + pattern(5, 2)[PS:]
    b.write(S([9]), memoryview(pattern(6, 1)), later=True)
    b.settle()
    b.settle()  # nothing pending
    assert b.stored_pages() == 8  # slots 0-5, 7 and 9
    assert read(b, [9]) == pattern(6, 1)
    b.write(S([10]), memoryview(pattern(7, 1)), later=True)
    store.destroy(KEY, b)  # going with a write pending: nothing to copy it into, no error


Z = bytes(8)


def read_words(b: Backing, slots: list[int] | range) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A read that takes same-filled pages as words: (the other pages, [(index, word)])."""
    same: list[tuple[int, bytes]] = []
    pieces = b.read(S(slots), same=same)
    assert pieces is not None
    return b"".join(pieces), same


@pytest.mark.parametrize("later", [False, True])
def test_same_filled_pages_are_stored_whole_and_marked(store: Store, later: bool) -> None:
    b = store.create(KEY, 64 * PS)
    word = b"abcdefgh"
    data = pattern(1, 3)
    # slots 10-14: a page, zeros (as their word), a page, a word page, a page
    b.write(S(range(10, 15)), memoryview(data), later, SamePages([1, 3], Z + word))
    whole = data[:PS] + bytes(PS) + data[PS : 2 * PS] + word * 512 + data[2 * PS :]
    assert read(b, range(10, 15)) == whole  # a reader that asks for no words reads the pages
    assert b.stored_pages() == 5
    # One that does: marked pages and pages never written (zeros) come as words.
    assert read_words(b, range(8, 15)) == (data, [(0, Z), (1, Z), (3, Z), (5, word)])
    assert read_words(b, [14, 13, 3]) == (data[2 * PS :], [(1, word), (2, Z)])
    # Scattered slots take words too; a page written whole over a marked slot unmarks it.
    b.write(S([13, 40, 41]), memoryview(pattern(2, 1)), later, SamePages([1, 2], word + Z))
    assert read_words(b, [13, 40, 41]) == (pattern(2, 1), [(1, word), (2, Z)])
    assert read(b, [13, 40, 41]) == pattern(2, 1) + word * 512 + bytes(PS)
    assert b.stored_pages() == 7
    b.discard(S([40, 11]))  # a discarded mark reads as zeros: still a word, not stored
    assert read_words(b, [40, 11]) == (b"", [(0, Z), (1, Z)])
    assert b.stored_pages() == 5
    b.write(S(range(40, 42)), memoryview(pattern(3, 2)))
    assert read_words(b, range(40, 42)) == (pattern(3, 2), [])
    store.destroy(KEY, b)


def test_a_file_store_keeps_same_filled_pages_whole_across_a_restart(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    b = store.create(KEY, 16 * PS)
    b.write(S(range(0, 3)), memoryview(pattern(1, 1)), same=SamePages([0, 2], Z + b"12345678"))
    b.close()
    ((_, again),) = FileStore(tmp_path / "root").existing()
    assert read(again, range(0, 3)) == bytes(PS) + pattern(1, 1) + b"12345678" * 512
    assert again.stored_pages() == 3
    # the marks lived in memory: the pages come whole now, but for what was never written
    assert read_words(again, range(0, 4)) == (bytes(PS) + pattern(1, 1) + b"12345678" * 512, [(3, Z)])
    again.close()


def test_file_store_layout_modes_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = FileStore(root)
    b = store.create(KEY, 16 * PS)
    b.write(S([1, 2]), memoryview(pattern(2, 2)))
    b.discard(S([2]))
    owner_dir = root / b"alice".hex()
    assert stat.S_IMODE(owner_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in owner_dir.iterdir())
    stem = b"vm1".hex()
    assert files == [f"{stem}.data", f"{stem}.map", f"{stem}.meta"]
    for f in owner_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert (owner_dir / f"{stem}.data").stat().st_blocks * 512 >= 16 * PS  # really allocated
    meta = json.loads((owner_dir / f"{stem}.meta").read_text())
    assert meta == {
        "format": 1,
        "owner": "alice",
        "name": "vm1",
        "size_bytes": 16 * PS,
        "page_size": PS,
    }
    b.close()

    again = FileStore(root).existing()
    assert [k for k, _ in again] == [KEY]
    reopened = again[0][1]
    assert reopened.stored_pages() == 1
    assert read(reopened, [1, 2]) == pattern(2, 2)[:PS] + bytes(PS)
    FileStore(root).destroy(KEY, reopened)
    assert [p.name for p in root.iterdir()] == [".state"]  # the store's own record only


def test_file_store_cleans_interrupted_creation_and_keeps_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    store = FileStore(root)
    store.create(KEY, 4 * PS).close()
    owner_dir = root / b"alice".hex()
    # an interrupted swapon: data and map, no meta
    (owner_dir / "aa.data").write_bytes(b"")
    (owner_dir / "aa.map").write_bytes(b"")
    (owner_dir / "bb.meta-tmp").write_text("{}")
    # metadata that does not match its place: logged and left alone
    bad = owner_dir / f"{b'other'.hex()}.meta"
    bad.write_text(
        json.dumps({"format": 1, "owner": "alice", "name": "vm1", "size_bytes": PS, "page_size": PS})
    )
    (root / "not-hex").mkdir()
    found = FileStore(root).existing()
    assert [k for k, _ in found] == [KEY]
    for _, b in found:
        b.close()
    assert not (owner_dir / "aa.data").exists() and not (owner_dir / "aa.map").exists()
    assert not (owner_dir / "bb.meta-tmp").exists()
    assert bad.exists() and (root / "not-hex").exists()


def test_memory_store_refuses_what_it_cannot_map() -> None:
    with pytest.raises(Exhausted, match="cannot allocate"):
        MemoryStore().create(KEY, 1 << 60)


def test_file_store_reads_from_the_page_cache_at_once_and_says_when_the_disk_must_be_read(
    tmp_path: Path,
) -> None:
    # AreaManager reads with wait=False on the event loop and, on None, again in an I/O thread.
    root = tmp_path / "root"
    b = FileStore(root).create(KEY, 64 * PS)
    b.write(S(range(0, 8)), memoryview(pattern(1, 8)))
    cached = b.read(S(range(0, 8)), wait=False)
    assert cached is not None and b"".join(cached) == pattern(1, 8)
    fd = os.open(root / b"alice".hex() / f"{b'vm1'.hex()}.data", os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
    finally:
        os.close(fd)
    assert b.read(S(range(0, 8)), wait=False) is None
    assert read(b, range(0, 8)) == pattern(1, 8)
    b.close()
