"""SwapOn: creation, re-attach, and every way it can be refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from netswap.server.app import build_server
from netswap.server.config import Config
from netswap.server.store import AreaKey, Backing, FileStore
from netswap.v1 import swap_pb2
from tests.helpers import PS, Running, auth, running_server, stored_files, stub_for, write_tokens


async def swapon(srv: Running, name: str, size: int, who: str = "alice") -> swap_pb2.SwapOnResponse:
    async with stub_for(srv.address) as stub:
        return await stub.SwapOn(swap_pb2.SwapOnRequest(name=name, size_bytes=size), metadata=auth(who))


async def swapon_error(srv: Running, name: str, size: int, who: str = "alice") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await swapon(srv, name, size, who)
    return err.value


async def test_create_reports_geometry(srv: Running) -> None:
    reply = await swapon(srv, "vm1", 1 << 20)
    assert reply.created
    assert reply.slot_count == (1 << 20) // PS
    assert reply.page_size == PS
    assert reply.max_batch_pages == srv.config.max_batch_pages
    assert len(reply.handle) >= 16


async def test_reattach_same_size_issues_new_handle_and_kills_old(srv: Running) -> None:
    first = await swapon(srv, "vm1", 1 << 20)
    again = await swapon(srv, "vm1", 1 << 20)
    assert not again.created
    assert again.handle != first.handle
    async with stub_for(srv.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SwapIn(swap_pb2.SwapInRequest(handle=first.handle, slots=[0]), metadata=auth("alice"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        reply = await stub.SwapIn(
            swap_pb2.SwapInRequest(handle=again.handle, slots=[0]), metadata=auth("alice")
        )
        assert reply.pages == bytes(PS)


async def test_reattach_other_size_is_failed_precondition(srv: Running) -> None:
    await swapon(srv, "vm1", 1 << 20)
    err = await swapon_error(srv, "vm1", 2 << 20)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "1048576" in (err.details() or "")


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, "../a", "a/b", "nul\x00byte", "ünïcode", "space name", "/abs"],
)
async def test_bad_names_are_invalid_argument(srv: Running, name: str) -> None:
    err = await swapon_error(srv, name, 1 << 20)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in (err.details() or "")
    if srv.store_root is not None:
        assert not stored_files(srv.store_root), "a refused swapon left files behind"


@pytest.mark.parametrize("name", ["a" * 64, "..", ".", "a.b-c_D9"])
async def test_odd_but_valid_names_stay_inside_the_store(srv: Running, name: str) -> None:
    reply = await swapon(srv, name, 1 << 20)
    assert reply.created
    if srv.store_root is not None:
        files = [p for p in stored_files(srv.store_root) if p.is_file()]
        assert files and all(p.resolve().is_relative_to(srv.store_root.resolve()) for p in files)
        assert all(name not in p.name for p in files if name not in (".",))


@pytest.mark.parametrize(
    ("size", "what"),
    [(0, "positive multiple"), (PS + 1, "positive multiple"), (100, "positive multiple"),
     ((32 << 20) + PS, "max area size"), (2**64 - 1, "positive multiple")],
)  # fmt: skip
async def test_bad_sizes_are_invalid_argument(srv: Running, size: int, what: str) -> None:
    err = await swapon_error(srv, "vm1", size)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert what in (err.details() or "")


async def test_capacity_exhaustion_leaves_nothing_behind(srv: Running) -> None:
    # capacity 64 MiB, max area 32 MiB
    await swapon(srv, "a", 32 << 20)
    await swapon(srv, "b", 30 << 20, who="bob")
    before = sorted(p.name for p in stored_files(srv.store_root)) if srv.store_root else []
    err = await swapon_error(srv, "c", 4 << 20)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in (err.details() or "")
    after = sorted(p.name for p in stored_files(srv.store_root)) if srv.store_root else []
    assert after == before
    assert srv.server.manager.reserved_bytes == 62 << 20
    # what fits still fits
    assert (await swapon(srv, "c", 2 << 20)).created


@pytest.mark.parametrize("store", ["memory", "file"])
async def test_quota_exhaustion_leaves_nothing_behind(tmp_path: Path, store: str) -> None:
    async with running_server(tmp_path, store, quotas={"alice": 3 << 20}) as srv:
        await swapon(srv, "a", 2 << 20)
        err = await swapon_error(srv, "b", 2 << 20)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota" in (err.details() or "")
        assert [a.name for a in srv.server.manager.list_areas("alice")] == ["a"]
        # bob has no quota: only capacity limits him
        assert (await swapon(srv, "b", 16 << 20, who="bob")).created
        # and alice can still use what is left of hers
        assert (await swapon(srv, "b", 1 << 20)).created


class SlowFileStore(FileStore):
    """A real file store whose reservations take a while, like fallocate of a big area on a slow disk."""

    def create(self, key: AreaKey, size_bytes: int) -> Backing:
        time.sleep(0.5)
        return super().create(key, size_bytes)


async def test_a_caller_that_gives_up_does_not_cut_a_reservation_in_half(tmp_path: Path) -> None:
    config = Config(listen="127.0.0.1:0", tokens=write_tokens(tmp_path / "tokens.toml"), metrics_listen="")
    server = build_server(config, SlowFileStore(tmp_path / "store"), CollectorRegistry())
    await server.start()
    try:
        async with stub_for(server.address) as stub:
            request = swap_pb2.SwapOnRequest(name="vm1", size_bytes=1 << 20)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SwapOn(request, metadata=auth("alice"), timeout=0.1)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the attach finished anyway: the area exists, is counted, and re-attaches
            again = await stub.SwapOn(request, metadata=auth("alice"))
            assert not again.created
            assert server.manager.reserved_bytes == 1 << 20
            await stub.SwapOut(
                swap_pb2.SwapOutRequest(handle=again.handle, slots=[0], pages=bytes(PS)),
                metadata=auth("alice"),
            )
    finally:
        await server.stop(None)


async def test_files_the_server_could_not_load_block_the_name_clearly(tmp_path: Path) -> None:
    root = tmp_path / "store"
    owner = root / b"alice".hex()
    owner.mkdir(parents=True)
    stem = b"vm1".hex()
    (owner / f"{stem}.meta").write_text("not json")
    (owner / f"{stem}.data").write_bytes(b"precious")
    async with running_server(tmp_path, f"file:{root}") as srv:
        err = await swapon_error(srv, "vm1", 1 << 20)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "could not be loaded" in (err.details() or "")
    assert (owner / f"{stem}.data").read_bytes() == b"precious"


async def test_capacity_error_tells_nothing_about_other_principals(srv: Running) -> None:
    await swapon(srv, "a", 32 << 20)
    await swapon(srv, "b", 30 << 20, who="bob")
    err = await swapon_error(srv, "c", 4 << 20)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(62 << 20) not in (err.details() or "") and str(32 << 20) not in (err.details() or "")


async def test_graceful_stop_lets_an_in_flight_swapon_finish(tmp_path: Path) -> None:
    config = Config(listen="127.0.0.1:0", tokens=write_tokens(tmp_path / "tokens.toml"), metrics_listen="")
    server = build_server(config, SlowFileStore(tmp_path / "store"), CollectorRegistry())
    await server.start()
    async with stub_for(server.address) as stub:
        call = asyncio.ensure_future(
            stub.SwapOn(swap_pb2.SwapOnRequest(name="vm1", size_bytes=1 << 20), metadata=auth("alice"))
        )
        await asyncio.sleep(0.1)  # the reservation is under way
        await server.stop(5)
        reply = await call
    assert reply.created
    # what it reserved is complete on disk, and a new server picks it up
    found = FileStore(tmp_path / "store").existing()
    assert [key.name for key, _ in found] == ["vm1"]
    for _, backing in found:
        backing.close()
