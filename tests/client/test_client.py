"""netswap.client against a real server: batching, buffers, pool backpressure, errors."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from netswap.client import (
    AreaNotFound,
    AuthenticationFailed,
    ConnectionLost,
    InvalidRequest,
    NoSpace,
    RequestRejected,
    SizeMismatch,
    SwapClient,
)
from netswap.common.pagewire import Bounds, decode_page_request
from netswap.v1 import swap_pb2
from tests.helpers import PS, TOKENS, Running, pattern, running_server


async def test_round_trip_across_many_batches(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 4 << 20)
        assert area.created and area.slot_count == 1024 and area.page_size == PS
        slots = list(range(area.slot_count))
        random.Random(1).shuffle(slots)
        data = pattern(1, len(slots))  # 4 batches of 256, in parallel
        await area.swap_out(slots, data)
        out = bytearray(len(data))
        lease = await area.swap_in(slots, into=out)
        lease.release()  # a no-op for caller buffers
        assert out == data
        assert srv.metric("netswap_swap_out_pages_total") == 1024
        assert srv.metric("netswap_batch_pages_count", {"method": "swap_out"}) == 4
        # from the pool, a part of it
        with await area.swap_in(slots[10:20]) as pages:
            assert pages.view == data[10 * PS : 20 * PS]
        assert area.pool.free_pages == area.pool.capacity
        await area.discard(slots[:5])
        with await area.swap_in(slots[:6]) as pages:
            assert pages.view == bytes(5 * PS) + data[5 * PS : 6 * PS]
        assert [(a.name, a.pages_stored) for a in await client.list_areas()] == [("vm1", 1019)]
        await area.swapoff()
        assert await client.list_areas() == []


if TYPE_CHECKING:
    _UnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _StreamInterceptor = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _StreamInterceptor = grpc.aio.StreamStreamClientInterceptor


class _PastServer(_UnaryInterceptor):
    """With `on`, SwapOn replies come back as a server from before `feature` (runs, same
    pages) sends them: without that flag."""

    on = False

    def __init__(self, feature: str = "takes_runs") -> None:
        self.feature = feature

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        if not (self.on and details.method.endswith(b"/SwapOn")):
            return call
        reply = swap_pb2.SwapOnResponse()
        reply.CopyFrom(await call)
        reply.ClearField(self.feature)  # type: ignore[arg-type]
        return reply


class _Recorder(_StreamInterceptor):
    """Records what the client sends on its page stream."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        async def recorded() -> AsyncIterator[bytes]:
            async for raw in requests:
                self.sent.append(raw)
                yield raw

        return await continuation(details, recorded())

    def words(self) -> list[list[int] | bool]:
        """What each request sent since the last look said of same-filled pages: a SwapOut the
        positions it sent as words, a SwapIn whether it took words in its reply."""
        said: list[list[int] | bool] = []
        for raw in self.sent:
            head = decode_page_request(raw, Bounds.for_batches(4096))[1]
            if isinstance(head, swap_pb2.SwapOutRequest):
                said.append(list(head.same_index))
            elif isinstance(head, swap_pb2.SwapInRequest):
                said.append(head.same_pages)
        self.sent.clear()
        return said

    def named(self) -> list[str]:
        """How each request sent since the last look named its slots: "run" or "listed"."""
        named = [
            "run" if decode_page_request(raw, Bounds.for_batches(4096))[1].run_count else "listed"
            for raw in self.sent
        ]
        self.sent.clear()
        return named


async def test_ranges_go_as_runs_only_to_a_server_that_takes_them(srv: Running) -> None:
    past, watch = _PastServer(), _Recorder()
    channel = grpc.aio.insecure_channel(srv.address, interceptors=[past, watch])  # type: ignore[list-item]
    async with SwapClient(channel, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 4 << 20)
        assert area.takes_runs  # this server says so at SwapOn
        data = pattern(2, 600)
        await area.swap_out(range(300, 900), data)  # 3 batches, each a run
        assert bytes((await area.swap_in(list(range(300, 900)), into=bytearray(len(data)))).view) == data
        await area.discard(range(300, 305))
        assert watch.named() == ["run"] * 3 + ["listed"] * 3 + ["run"]
        # Against a server from before runs (as SwapOn says after a re-attach):
        # the same ranges go as lists, and mean the same.
        past.on = True
        assert not await area.reattach()
        await area.swap_out(range(0, 10), data[: 10 * PS])
        with await area.swap_in(range(0, 10)) as got:
            assert got.view == data[: 10 * PS]
        await area.discard(range(0, 5))
        assert watch.named() == ["listed"] * 3
        past.on = False
        await area.reattach()
        assert area.takes_runs
        with await area.swap_in(range(300, 310)) as run:
            assert run.view == bytes(5 * PS) + data[5 * PS : 10 * PS]
        assert watch.named() == ["run"]
        assert srv.server.manager.list_areas("alice")[0].pages_stored == 600 - 5 + 10 - 5


async def test_same_filled_pages_go_as_words_only_between_peers_that_take_them(srv: Running) -> None:
    past, watch = _PastServer("takes_same_pages"), _Recorder()
    channel = grpc.aio.insecure_channel(srv.address, interceptors=[past, watch])  # type: ignore[list-item]
    word = b"abcdefgh"
    # a page, zeros, a page, a word repeated
    data = pattern(3, 1) + bytes(PS) + pattern(4, 1) + word * (PS // 8)
    async with SwapClient(channel, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 1 << 20)
        assert area.takes_same_pages  # this server says so at SwapOn
        await area.swap_out(range(0, 4), data)
        with await area.swap_in(range(0, 6)) as got:  # two pages never written: zeros, as words
            assert got.view == data + bytes(2 * PS)
        assert watch.words() == [[1, 3], True]
        # A client from before same pages (or told not to send them) reads them whole,
        # and what it writes whole reads back the same through one that takes words.
        async with await SwapClient.connect(srv.address, TOKENS["alice"], same_pages=False) as old:
            old_area = await old.swapon("vm1", 1 << 20)
            assert not old_area.takes_same_pages
            with await old_area.swap_in(range(0, 4)) as got:
                assert got.view == data
            await old_area.swap_out(range(4, 8), data)
        await area.reattach()  # the old client took the area over
        with await area.swap_in(range(0, 8)) as got:
            assert got.view == data * 2
        assert watch.words() == [True]
        # Against a server from before same pages (as SwapOn says after a re-attach):
        # whole pages both ways, meaning the same.
        past.on = True
        assert not await area.reattach()
        await area.swap_out(range(8, 12), data)
        with await area.swap_in(range(8, 12)) as got:
            assert got.view == data
        assert watch.words() == [[], False]
        past.on = False
        await area.reattach()
        assert area.takes_same_pages
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 12


async def test_more_concurrent_reads_than_pool_pages(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 1 << 20, pool_pages=8)
        data = pattern(2, 256)
        await area.swap_out(range(256), data)
        capacity, nbytes = area.pool.capacity, area.pool.nbytes
        in_use = peak = 0

        async def reader(i: int) -> None:
            nonlocal in_use, peak
            n = 1 + i % 4
            first = (i * 7) % (256 - n)
            with await area.swap_in(range(first, first + n)) as pages:
                in_use += n
                peak = max(peak, in_use)
                assert pages.view == data[first * PS : (first + n) * PS]
                await asyncio.sleep(0.001)  # hold the pages across a scheduling point
                in_use -= n

        await asyncio.wait_for(asyncio.gather(*(reader(i) for i in range(100))), 30)
        assert peak <= capacity  # 100 readers x up to 4 pages, through 8 pages
        assert peak > 1  # and they really were concurrent
        assert (area.pool.capacity, area.pool.nbytes) == (capacity, nbytes)
        assert area.pool.free_pages == capacity
        with pytest.raises(InvalidRequest, match="exceed the page pool"):
            await area.swap_in(range(9))
        await area.swapoff()


async def test_errors_map_to_exceptions(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 1 << 20)
        with pytest.raises(InvalidRequest, match="out of range"):
            await area.swap_out([256], bytes(PS))
        with pytest.raises(InvalidRequest, match="need 8192"):
            await area.swap_out([1, 2], bytes(PS))
        with pytest.raises(InvalidRequest, match="more than once"):
            await area.discard([1, 1])
        with pytest.raises(SizeMismatch):
            await client.swapon("vm1", 2 << 20)
        (await client.swapon("huge", 32 << 20)).detach()  # 33 of 64 MiB reserved
        with pytest.raises(NoSpace, match="capacity"):
            await client.swapon("huge2", 32 << 20)
        with pytest.raises(InvalidRequest, match="name"):
            await client.swapon("a/b", PS)
        # a re-attach elsewhere takes the area over
        again = await client.swapon("vm1", 1 << 20)
        with pytest.raises(AreaNotFound) as err:
            await area.swap_in([0])
        assert isinstance(err.value, RequestRejected)
        await again.swapoff()
        with pytest.raises(AreaNotFound):
            await client.swapoff("vm1")
    async with await SwapClient.connect(srv.address, "not-a-token") as client:
        with pytest.raises(AuthenticationFailed):
            await client.list_areas()


async def test_swapoff_by_name(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["bob"]) as client:
        area = await client.swapon("gone", PS)
        area.detach()
        await client.swapoff("gone")
        assert await client.list_areas() == []


async def test_unreachable_server_is_connection_lost(tmp_path: Path) -> None:
    async with await SwapClient.connect(f"unix:{tmp_path / 'nobody.sock'}", "t", timeout=5) as client:
        with pytest.raises(ConnectionLost):
            await client.list_areas()


async def test_server_gone_mid_session_is_connection_lost(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        client = await SwapClient.connect(srv.address, TOKENS["alice"], timeout=5)
        area = await client.swapon("vm1", PS)
    # the server is stopped now
    with pytest.raises(ConnectionLost):
        await area.swap_in([0])
    await client.close()


async def test_a_failed_batch_stops_the_others_before_the_call_returns(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 8 << 20)  # 2048 slots, 8 batches
        await area.swap_out(range(2048), pattern(5, 2048))
        slots = [4096, *range(1, 2048)]  # the first batch is invalid
        buf = bytearray(len(slots) * PS)
        with pytest.raises(InvalidRequest):
            await area.swap_in(slots, into=buf)
        snapshot = bytes(buf)
        await asyncio.sleep(0.2)
        assert bytes(buf) == snapshot, "batches kept writing into the buffer after the call failed"
        # the pool stays usable, and swapoff works even with a lease out
        lease = await area.swap_in([1])
        await area.swapoff()
        lease.release()
