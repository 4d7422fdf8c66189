"""After SwapOn, writes cannot fail for lack of space -- whatever else fills the disk."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from netswap.v1 import swap_pb2
from tests.helpers import auth, pattern, running_server, stored_files, stub_for


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and needs root (CI runs as root)")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(path: Path) -> int:
    """Write to `path` until the filesystem is full; return bytes written."""
    chunk = bytes(64 * 1024)
    written = 0
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                n = f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return written
            written += n or 0
            if not n:
                return written


@pytest.mark.root
async def test_swap_out_into_every_slot_of_a_full_disk(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "16m") as mnt:
        store = mnt / "store"
        async with running_server(tmp_path, f"file:{store}") as srv, stub_for(srv.address) as stub:
            size = 8 << 20
            a = await stub.SwapOn(swap_pb2.SwapOnRequest(name="vm1", size_bytes=size), metadata=auth("alice"))
            # the rest of the filesystem goes to someone else
            assert fill(mnt / "filler") > 0
            assert os.statvfs(mnt).f_bavail == 0

            # a second area cannot reserve, and leaves nothing behind
            before = sorted(p.name for p in stored_files(store))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SwapOn(swap_pb2.SwapOnRequest(name="vm2", size_bytes=size), metadata=auth("bob"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "not enough space" in (err.value.details() or "")
            assert sorted(p.name for p in stored_files(store)) == before
            assert srv.server.manager.reserved_bytes == size

            # every slot of the reserved area still takes a write
            slots = a.slot_count
            batch = a.max_batch_pages
            for start in range(0, slots, batch):
                n = min(batch, slots - start)
                await stub.SwapOut(
                    swap_pb2.SwapOutRequest(
                        handle=a.handle, slots=range(start, start + n), pages=pattern(start, n)
                    ),
                    metadata=auth("alice"),
                )
            # discard keeps the reservation: the slots can be written again
            await stub.Discard(
                swap_pb2.DiscardRequest(handle=a.handle, slots=range(batch)), metadata=auth("alice")
            )
            assert fill(mnt / "filler2") == 0
            await stub.SwapOut(
                swap_pb2.SwapOutRequest(handle=a.handle, slots=range(batch), pages=pattern(0, batch)),
                metadata=auth("alice"),
            )
            for start in range(0, slots, batch):
                n = min(batch, slots - start)
                got = await stub.SwapIn(
                    swap_pb2.SwapInRequest(handle=a.handle, slots=range(start, start + n)),
                    metadata=auth("alice"),
                )
                assert got.pages == pattern(start, n), f"pages at slot {start} differ"
