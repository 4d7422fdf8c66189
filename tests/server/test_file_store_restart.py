"""The file store keeps acknowledged pages across kill -9 of the server process."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from netswap.client import sync
from netswap.v1 import swap_pb2
from tests.helpers import PS, TOKENS, auth, pattern, server_process, stub_for


async def test_pages_survive_kill_9_and_reattach(tmp_path: Path) -> None:
    root = tmp_path / "store"
    slots = [5, 0, 1, 2, 200, 17]
    data = pattern(11, len(slots))
    with server_process(tmp_path, root) as server:
        async with stub_for(server.address) as stub:
            a = await stub.SwapOn(
                swap_pb2.SwapOnRequest(name="vm1", size_bytes=1 << 20), metadata=auth("alice")
            )
            await stub.SwapOut(
                swap_pb2.SwapOutRequest(handle=a.handle, slots=slots, pages=data),
                metadata=auth("alice"),
            )
            await stub.Discard(swap_pb2.DiscardRequest(handle=a.handle, slots=[17]), metadata=auth("alice"))
            b = await stub.SwapOn(swap_pb2.SwapOnRequest(name="other", size_bytes=PS), metadata=auth("bob"))
            await stub.SwapOut(
                swap_pb2.SwapOutRequest(handle=b.handle, slots=[0], pages=data[:PS]),
                metadata=auth("bob"),
            )
        # acknowledged: now kill without any chance to flush or clean up
        server.kill9()
        server.start()
        async with stub_for(server.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SwapIn(swap_pb2.SwapInRequest(handle=a.handle, slots=[0]), metadata=auth("alice"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            listed = await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))
            assert [(x.name, x.size_bytes, x.pages_stored) for x in listed.areas] == [("vm1", 1 << 20, 5)]

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SwapOn(
                    swap_pb2.SwapOnRequest(name="vm1", size_bytes=2 << 20), metadata=auth("alice")
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            again = await stub.SwapOn(
                swap_pb2.SwapOnRequest(name="vm1", size_bytes=1 << 20), metadata=auth("alice")
            )
            assert not again.created
            got = await stub.SwapIn(
                swap_pb2.SwapInRequest(handle=again.handle, slots=slots), metadata=auth("alice")
            )
            assert got.pages == data[: 5 * PS] + bytes(PS)  # slot 17 was discarded

            other = await stub.SwapOn(
                swap_pb2.SwapOnRequest(name="other", size_bytes=PS), metadata=auth("bob")
            )
            got = await stub.SwapIn(
                swap_pb2.SwapInRequest(handle=other.handle, slots=[0]), metadata=auth("bob")
            )
            assert got.pages == data[:PS]
        assert server.terminate() == 0
    assert "stopped" in server.log.read_text()


async def test_restart_counts_existing_areas_against_capacity(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with server_process(tmp_path, root) as server:  # capacity 256 MiB
        async with stub_for(server.address) as stub:
            await stub.SwapOn(
                swap_pb2.SwapOnRequest(name="big", size_bytes=200 << 20), metadata=auth("alice")
            )
        server.kill9()
        server.start()
        async with stub_for(server.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SwapOn(
                    swap_pb2.SwapOnRequest(name="more", size_bytes=100 << 20), metadata=auth("bob")
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def run(tmp_path: Path, n: int) -> Path:
    """A directory of its own for the n-th server process (its socket and log) on one store."""
    home = tmp_path / f"run{n}"
    home.mkdir()
    return home


def test_a_crash_of_the_host_starts_the_areas_it_may_have_hurt_afresh(tmp_path: Path) -> None:
    # The page cache dies with the host: an area found after an unclean stop in an
    # earlier boot may have lost pages, so its next SwapOn makes it empty (created)
    # rather than serve what is left. A clean stop, rebooted or not, keeps it.
    store = tmp_path / "store"
    state = store / ".state"
    with server_process(run(tmp_path, 1), store) as server:
        with sync.SwapClient(server.address, TOKENS["alice"]) as client:
            for name in ("kept", "hurt"):
                area = client.swapon(name, 1 << 20)
                area.swap_out(range(0, 8), pattern(1, 8))
                area.detach()
        assert server.terminate() == 0  # a clean stop: everything synced
    recorded = json.loads(state.read_text())
    assert recorded["clean"] is True and recorded["suspect"] == []
    recorded["boot_id"] = "an-earlier-boot"
    state.write_text(json.dumps(recorded))
    with server_process(run(tmp_path, 2), store) as server:
        with sync.SwapClient(server.address, TOKENS["alice"]) as client:
            area = client.swapon("kept", 1 << 20)
            assert not area.created and bytes(area.swap_in(range(0, 8)).view) == pattern(1, 8)
            area.detach()
        server.kill9()  # an unclean stop...
    recorded = json.loads(state.read_text())
    assert recorded["clean"] is False
    recorded["boot_id"] = "an-earlier-boot"  # ...in a boot that is over: the host crashed
    state.write_text(json.dumps(recorded))
    with server_process(run(tmp_path, 3), store) as server:
        with sync.SwapClient(server.address, TOKENS["alice"]) as client:
            assert {a.name: a.pages_stored for a in client.list_areas()} == {"hurt": 8, "kept": 8}
            area = client.swapon("hurt", 1 << 20)
            assert area.created  # as good as lost: made afresh
            assert bytes(area.swap_in(range(0, 8)).view) == bytes(8 * PS)
            area.detach()
        server.kill9()
    # "kept" was not attached since: it is still suspect after another restart
    assert json.loads(state.read_text())["suspect"] == [[b"alice".hex(), b"kept".hex()]]
    with (
        server_process(run(tmp_path, 4), store) as server,
        sync.SwapClient(server.address, TOKENS["alice"]) as client,
    ):
        assert client.swapon("kept", 1 << 20).created
        assert client.swapon("hurt", 1 << 20).created is False
