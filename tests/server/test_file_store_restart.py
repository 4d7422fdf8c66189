"""The file store keeps acknowledged pages across kill -9 of the server process."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from netswap.v1 import swap_pb2
from tests.helpers import PS, auth, pattern, server_process, stub_for


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
