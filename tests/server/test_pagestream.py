"""PageStream: page requests as messages on one call, raw on the wire and through the client.

Each request must mean what its unary method means; a failed one is answered
in-band and the stream carries on; replies come in request order; a revoked
caller's stream ends; a stuck stream is abandoned and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from netswap.client import SwapClient
from netswap.client.errors import AreaNotFound, ConnectionLost, InvalidRequest
from netswap.common.pagewire import (
    Bounds,
    decode_page_reply,
    encode_page_request,
    encode_page_swap_in,
    encode_page_swap_out,
    split_page_reply,
)
from netswap.common.samepages import SamePages
from netswap.server.fairshare import FairShare
from netswap.server.metrics import ServerMetrics
from netswap.server.pagestream import PageStreams
from netswap.server.requests import PagePath
from netswap.v1 import swap_pb2
from tests.helpers import PS, TOKENS, Running, ServerProcess, auth, pattern, running_server, stub_for

METHOD = "/netswap.v1.SwapService/PageStream"


class RawStream:
    """A PageStream call driven by hand: bytes in, (code, message, pages) out."""

    def __init__(self, channel: grpc.aio.Channel, who: str) -> None:
        open_call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        self.call = open_call(None, metadata=auth(who))

    async def send(self, raw: bytes) -> None:
        await self.call.write(raw)

    async def reply(self) -> tuple[int, str, bytes]:
        raw = await self.call.read()
        assert isinstance(raw, bytes), raw
        code, message, pages = decode_page_reply(raw)
        return code, message, bytes(pages)

    async def ask(self, raw: bytes) -> tuple[int, str, bytes]:
        await self.send(raw)
        return await self.reply()


def swap_in(handle: bytes, slots: list[int]) -> bytes:
    return encode_page_request(swap_pb2.SwapInRequest(handle=handle, slots=slots))


def swap_out(handle: bytes, slots: list[int], data: bytes) -> bytes:
    return encode_page_swap_out(handle, slots, [memoryview(data)])


OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
async def channel(srv: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(srv.address) as ch:
        yield ch


@contextlib.asynccontextmanager
async def stoppable_server(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """A server subprocess the test may stop (SIGSTOP): (its address, its pid). It is resumed
    and stopped afterwards, whatever happened."""
    server = ServerProcess(tmp_path, tmp_path / "store")
    await server.astart()
    assert server.proc is not None
    try:
        yield server.address, server.proc.pid
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop_quietly()


async def attach(address: str, who: str = "alice", name: str = "vm1") -> bytes:
    async with stub_for(address) as stub:
        reply = await stub.SwapOn(swap_pb2.SwapOnRequest(name=name, size_bytes=64 * PS), metadata=auth(who))
        return reply.handle


async def test_requests_mean_what_the_unary_methods_mean(srv: Running, channel: grpc.aio.Channel) -> None:
    handle = await attach(srv.address)
    stream = RawStream(channel, "alice")
    data = pattern(3, 3)
    assert await stream.ask(swap_out(handle, [5, 1, 9], data)) == (OK, "", b"")
    assert await stream.ask(swap_in(handle, [5, 1, 9])) == (OK, "", data)
    discard = encode_page_request(swap_pb2.DiscardRequest(handle=handle, slots=[1]))
    assert await stream.ask(discard) == (OK, "", b"")
    assert await stream.ask(swap_in(handle, [1])) == (OK, "", bytes(PS))
    # a run names the same slots as their list
    run_in = encode_page_request(swap_pb2.SwapInRequest(handle=handle, run_start=8, run_count=2))
    assert await stream.ask(run_in) == (OK, "", bytes(PS) + data[2 * PS :])
    # and the unary methods see the same area
    async with stub_for(srv.address) as stub:
        reply = await stub.SwapIn(swap_pb2.SwapInRequest(handle=handle, slots=[9]), metadata=auth("alice"))
        assert reply.pages == data[2 * PS :]
    assert srv.metric("netswap_swap_out_pages_total") == 3
    assert srv.metric("netswap_rpc_duration_seconds_count", {"method": "SwapIn", "code": "OK"}) == 4


async def test_a_failed_request_is_answered_in_band_and_the_stream_goes_on(
    srv: Running, channel: grpc.aio.Channel
) -> None:
    handle = await attach(srv.address)
    bobs = await attach(srv.address, "bob")
    stream = RawStream(channel, "alice")
    data = pattern(4, 1)
    assert await stream.ask(swap_out(handle, [2], data)) == (OK, "", b"")
    bad = [
        (swap_out(handle, [64], data), INVALID_ARGUMENT, "slot 64"),  # past the end
        (swap_out(handle, [3], data[:100]), INVALID_ARGUMENT, "bytes"),  # blob of the wrong length
        (swap_in(b"x" * 16, [0]), NOT_FOUND, ""),  # no such handle
        (swap_in(bobs, [0]), NOT_FOUND, ""),  # bob's area: alice cannot tell it exists
        (b"\xff\xff\xff", INVALID_ARGUMENT, "malformed"),  # not a PageRequest at all
        (b"", INVALID_ARGUMENT, "no operation"),
        # slots named both ways; a run past the end
        (
            encode_page_request(swap_pb2.SwapInRequest(handle=handle, slots=[2], run_start=2, run_count=1)),
            INVALID_ARGUMENT,
            "not both",
        ),
        (
            encode_page_swap_out(handle, range(63, 65), [memoryview(data * 2)], True),
            INVALID_ARGUMENT,
            "slot 64",
        ),
    ]
    for raw, code, words in bad:
        got_code, message, pages = await stream.ask(raw)
        assert (got_code, pages) == (code, b""), (raw[:20], got_code, message)
        assert words in message
    # nothing was lost or changed, and the same stream still works
    assert await stream.ask(swap_in(handle, [2, 3])) == (OK, "", data + bytes(PS))
    assert srv.metric("netswap_rpc_duration_seconds_count", {"method": "SwapIn", "code": "NOT_FOUND"}) == 2


async def test_same_filled_pages_travel_as_words_both_ways_and_bad_ones_are_refused(
    srv: Running, channel: grpc.aio.Channel
) -> None:
    handle = await attach(srv.address)
    stream = RawStream(channel, "alice")
    data, word = pattern(5, 2), b"abcdefgh"
    # slots 0-3: a page, zeros, a page, a word page -- only the two pages in the blob
    out = encode_page_swap_out(
        handle, range(0, 4), [memoryview(data)], True, SamePages([1, 3], bytes(8) + word)
    )
    assert await stream.ask(out) == (OK, "", b"")
    whole = data[:PS] + bytes(PS) + data[PS:] + word * 512
    assert await stream.ask(swap_in(handle, [0, 1, 2, 3])) == (OK, "", whole)  # asked for no words
    await stream.send(encode_page_swap_in(handle, range(0, 6), True, same_pages=True))
    raw = await stream.call.read()
    assert isinstance(raw, bytes)
    got_code, _, got, same = split_page_reply(raw)
    assert (got_code, bytes(got), same) == (OK, data, SamePages([1, 3, 4, 5], bytes(8) + word + bytes(16)))
    async with stub_for(srv.address) as stub:  # the unary SwapIn answers the same way
        reply = await stub.SwapIn(
            swap_pb2.SwapInRequest(handle=handle, slots=[3, 2], same_pages=True), metadata=auth("alice")
        )
        assert (reply.pages, list(reply.same_index), reply.same_word[0].to_bytes(8, "little")) == (
            data[PS:],
            [0],
            word,
        )
    assert srv.metric("netswap_swap_out_pages_total") == 4
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 4

    def with_same(index: list[int], words: list[int], blob: bytes) -> bytes:
        message = swap_pb2.SwapOutRequest(
            handle=handle, run_start=8, run_count=3, pages=blob, same_index=index
        )
        message.same_word.extend(words)
        return swap_pb2.PageRequest(swap_out=message).SerializeToString()

    bad = [
        (with_same([1, 0], [0, 0], data[:PS]), "must increase"),
        (with_same([1, 1], [0, 0], data[:PS]), "must increase"),
        (with_same([1], [0, 0], data[:PS] * 2), "1 same_index for 2 same_word"),
        (with_same([3], [0], data), "same_index 3 past"),
        (with_same([1], [0], data[:PS]), "2 slots not sent as a word need exactly"),
    ]
    for raw, words in bad:
        code, message, pages = await stream.ask(raw)
        assert (code, pages) == (INVALID_ARGUMENT, b""), message
        assert words in message
    assert await stream.ask(swap_in(handle, [8, 9, 10])) == (OK, "", bytes(3 * PS))  # nothing written


async def test_replies_come_in_request_order_when_pipelined(srv: Running, channel: grpc.aio.Channel) -> None:
    handle = await attach(srv.address)
    stream = RawStream(channel, "alice")
    for slot in range(64):
        await stream.send(swap_out(handle, [slot], pattern(slot, 1)))
    for slot in range(64):
        await stream.send(swap_in(handle, [63 - slot]))
    assert [await stream.reply() for _ in range(64)] == [(OK, "", b"")] * 64
    for slot in range(64):
        assert await stream.reply() == (OK, "", pattern(63 - slot, 1))


async def test_an_acknowledged_swap_out_is_there_for_whoever_asks_next(
    srv: Running, channel: grpc.aio.Channel
) -> None:
    # The memory store copies a SwapOut's pages once its reply has left
    # (PageStreams.serve). Whoever asks next -- on another stream, by a unary
    # call, after the writing stream is gone -- must find them.
    handle = await attach(srv.address)
    writer = RawStream(channel, "alice")
    async with grpc.aio.insecure_channel(srv.address) as other, stub_for(srv.address) as stub:
        reader = RawStream(other, "alice")
        for n, slots in enumerate((range(0, 4), range(8, 12), range(16, 20))):
            as_run = encode_page_swap_out(handle, slots, [memoryview(pattern(n, 4))], True)
            assert await writer.ask(as_run) == (OK, "", b"")
            assert await reader.ask(swap_in(handle, list(slots))) == (OK, "", pattern(n, 4))
        assert await writer.ask(swap_out(handle, [30, 31], pattern(7, 2))) == (OK, "", b"")
        listed = await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))
        assert [a.pages_stored for a in listed.areas] == [14]
        assert await writer.ask(swap_out(handle, [40, 41], pattern(8, 2))) == (OK, "", b"")
        writer.call.cancel()
        reply = await stub.SwapIn(
            swap_pb2.SwapInRequest(handle=handle, slots=[40, 41]), metadata=auth("alice")
        )
        assert reply.pages == pattern(8, 2)


def fed(*raws: bytes) -> AsyncIterator[bytes]:
    """A stream's requests, as PageStreams reads them."""

    async def requests() -> AsyncIterator[bytes]:
        for raw in raws:
            yield raw

    return requests()


class Parked:
    """PageStreams.run driven by hand on one request, parked right after it sent its reply."""

    def __init__(self, streams: PageStreams, raw: bytes) -> None:
        self.sent: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.go = asyncio.Event()

        async def send(reply: bytes) -> None:
            self.sent.set_result(reply)
            await self.go.wait()

        self.task = asyncio.ensure_future(streams.run("alice", fed(raw), send))

    async def reply(self) -> bytes:
        return await self.sent

    async def resume(self) -> None:
        self.go.set()
        await self.task

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_a_stream_copies_a_swap_out_after_its_reply_and_before_anyone_reads(srv: Running) -> None:
    # Each stream parked right after its reply: where the memory store's copy is still pending.
    manager = srv.server.manager
    path = PagePath(manager, ServerMetrics(CollectorRegistry()), FairShare())
    streams = PageStreams(manager, srv.server.gate, path, Bounds.for_batches(manager.max_batch_pages))
    handle = (await manager.swapon("alice", "vm1", 64 * PS)).handle

    async def read(slots: list[int]) -> bytes:
        return b"".join(await manager.swap_in(manager.attached("alice", handle, "SwapIn"), slots))

    first = Parked(streams, swap_out(handle, [1, 2], pattern(1, 2)))
    assert await first.reply() == b""  # an empty PageReply: OK
    # Not copied yet in memory (the scrape-time count does not settle); the
    # file store wrote before it answered.
    assert manager.stored_pages() == (0 if srv.store_root is None else 2)
    second = Parked(streams, swap_out(handle, [2, 3], pattern(2, 2)))
    assert await second.reply() == b""
    # The first write landed before the second: the last acknowledged wins slot 2.
    assert await read([1, 2, 3]) == pattern(1, 2)[:PS] + pattern(2, 2)
    for stream in (second, first):  # resumed in the other order: nothing changes
        await stream.resume()
    assert await read([1, 2, 3]) == pattern(1, 2)[:PS] + pattern(2, 2)
    # A stream closed while parked (cancelled) copies at once.
    third = Parked(streams, swap_out(handle, [9], pattern(3, 1)))
    assert await third.reply() == b""
    await third.close()
    assert manager.stored_pages() == 4
    # One never resumed: whoever asks next finds the pages.
    fourth = Parked(streams, swap_out(handle, [10], pattern(4, 1)))
    assert await fourth.reply() == b""
    assert [a.pages_stored for a in manager.list_areas("alice")] == [5]
    assert await read([10, 9]) == pattern(4, 1) + pattern(3, 1)
    await fourth.close()


async def test_an_unknown_caller_cannot_open_a_stream(srv: Running, channel: grpc.aio.Channel) -> None:
    open_call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    call = open_call(None, metadata=(("authorization", "Bearer nope"),))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.write(swap_in(b"x" * 16, [0]))  # the refusal may already be here
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert srv.metric("netswap_auth_failures_total", {"reason": "unknown_token"}) == 1


async def test_a_revoked_token_ends_an_open_stream(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        handle = await attach(srv.address)
        stream = RawStream(channel, "alice")
        assert (await stream.ask(swap_in(handle, [0])))[0] == OK
        tokens = tmp_path / "tokens.toml"
        text = tokens.read_text()
        tokens.write_text(text[text.index("[principals.bob]") :])  # alice removed
        srv.server.credentials.reload()  # what SIGHUP does
        await stream.send(swap_in(handle, [0]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.reply()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # an unchanged principal's stream survives a reload
        bobs = await attach(srv.address, "bob")
        bob = RawStream(channel, "bob")
        assert (await bob.ask(swap_in(bobs, [0])))[0] == OK
        srv.server.credentials.reload()
        assert (await bob.ask(swap_in(bobs, [0])))[0] == OK


async def test_client_errors_from_the_stream_are_the_unary_ones(srv: Running) -> None:
    async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
        area = await client.swapon("vm1", 8 * PS)
        with pytest.raises(InvalidRequest, match="INVALID_ARGUMENT"):
            await area.write_batch([8], [memoryview(bytes(PS))])
        await area.swapoff()
        with pytest.raises(AreaNotFound, match="NOT_FOUND"):
            await area.read_batch([0], [memoryview(bytearray(PS))])


async def test_a_stuck_stream_is_abandoned_and_the_next_request_opens_a_new_one(tmp_path: Path) -> None:
    async with (
        stoppable_server(tmp_path) as (address, pid),
        await SwapClient.connect(address, TOKENS["alice"], timeout=1.0) as client,
    ):
        area = await client.swapon("vm1", 8 * PS)
        data = pattern(9, 2)
        await area.write_batch([0, 1], [memoryview(data)])
        os.kill(pid, signal.SIGSTOP)  # alive, connected, and silent

        async def later(request: Awaitable[None]) -> None:
            await asyncio.sleep(0.5)
            await request

        try:
            results = await asyncio.gather(
                area.write_batch([2], [memoryview(data[:PS])]),
                area.read_batch([0], [memoryview(bytearray(PS))]),
                # Half a timeout later, 4 MiB: more than HTTP/2 lets out
                # unacknowledged, so it is still being sent when the first
                # requests' time is up and the stream is given up.
                later(area.write_batch(list(range(8)), [memoryview(bytes(8 * PS))] * 128)),
                later(area.discard_batch([3])),
                return_exceptions=True,
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        # every one fails, and as retryable -- not as a cancellation nobody asked for
        assert [type(r) for r in results] == [ConnectionLost] * 4, results
        into = bytearray(2 * PS)
        await area.read_batch([0, 1], [memoryview(into)])
        assert into == data


async def test_the_timeout_bounds_each_request_not_the_stream(srv: Running) -> None:
    """One watchdog timer per stream: requests that each finish in time keep the stream, however
    long it is busy or idle, and a request after an idle spell is bounded again."""
    async with await SwapClient.connect(srv.address, TOKENS["alice"], timeout=0.5) as client:
        area = await client.swapon("vm1", 8 * PS)
        loop = asyncio.get_running_loop()
        await area.write_batch([0], [memoryview(pattern(0, 1))])
        stream = client._pages._stream
        await asyncio.sleep(0.8)  # idle past the first request's deadline
        end, n = loop.time() + 1.6, 1
        while loop.time() < end:  # busy past several deadlines
            await asyncio.gather(
                area.write_batch([n % 8], [memoryview(pattern(n, 1))]),
                area.read_batch([(n - 1) % 8], [memoryview(bytearray(PS))]),
            )
            n += 1
        assert client._pages._stream is stream  # never abandoned
        into = bytearray(PS)
        await area.read_batch([(n - 1) % 8], [memoryview(into)])
        assert into == pattern(n - 1, 1)


async def test_a_lowered_timeout_bounds_the_next_request(tmp_path: Path) -> None:
    """The stream's watchdog was armed for the old timeout; a shorter one must still hold."""
    async with (
        stoppable_server(tmp_path) as (address, pid),
        await SwapClient.connect(address, TOKENS["alice"], timeout=60.0) as client,
    ):
        area = await client.swapon("vm1", 8 * PS)
        os.kill(pid, signal.SIGSTOP)
        first = asyncio.ensure_future(area.discard_batch([0]))
        await asyncio.sleep(0.2)
        client.timeout = 0.5
        with pytest.raises(ConnectionLost, match=r"within 0\.5s"):
            await asyncio.wait_for(area.discard_batch([1]), 10)
        with pytest.raises(ConnectionLost):
            await first  # the same stream, abandoned with it


async def test_a_stream_to_a_server_that_never_answers_the_handshake_times_out(tmp_path: Path) -> None:
    """The connection is accepted (by the kernel) but the server never speaks: the stream
    cannot even send its headers. The request must still end at the timeout."""
    async with stoppable_server(tmp_path) as (address, pid):
        os.kill(pid, signal.SIGSTOP)
        async with await SwapClient.connect(address, TOKENS["alice"], timeout=1.0) as client:
            raw = encode_page_request(swap_pb2.DiscardRequest(handle=b"h" * 16, slots=[0]))
            for _ in range(2):  # and again, on a new stream
                with pytest.raises(ConnectionLost, match="within 1s"):
                    await asyncio.wait_for(client._pages.request(raw), 10)


async def test_a_cancelled_waiter_drops_out_and_a_cancelled_reader_ends_the_stream(tmp_path: Path) -> None:
    async with (
        stoppable_server(tmp_path) as (address, pid),
        await SwapClient.connect(address, TOKENS["alice"], timeout=30.0) as client,
    ):
        area = await client.swapon("vm1", 8 * PS)
        await area.write_batch([0], [memoryview(pattern(5, 1))])

        def read() -> asyncio.Task[None]:
            return asyncio.ensure_future(area.read_batch([0], [memoryview(bytearray(PS))]))

        async def two_reads_one_cancelled(cancel_reader: bool) -> tuple[asyncio.Task[None], ...]:
            """Two reads sent to a stopped server, one cancelled, then the server resumes."""
            os.kill(pid, signal.SIGSTOP)
            reader, waiter = read(), read()
            await asyncio.sleep(0.2)
            (reader if cancel_reader else waiter).cancel()
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGCONT)
            return reader, waiter

        # The first request reads for both; the second only waits, and may go.
        reader, waiter = await two_reads_one_cancelled(cancel_reader=False)
        await reader
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.5)  # the dropped request's reply comes and is thrown away
        # The reader may go too, but that ends the stream: the other fails
        # retryably, and the next request gets a new stream.
        reader, waiter = await two_reads_one_cancelled(cancel_reader=True)
        with pytest.raises(asyncio.CancelledError):
            await reader
        with pytest.raises(ConnectionLost, match="cancelled"):
            await waiter
        into = bytearray(PS)
        await area.read_batch([0], [memoryview(into)])
        assert into == pattern(5, 1)


async def test_callers_queued_to_write_may_be_cancelled_as_the_write_ends(tmp_path: Path) -> None:
    """A writer held up by flow control, callers queued behind it, and the writer and the
    first of them cancelled in one go: the writer's exit hands the write on past the
    cancelled caller in the same loop turn. Each cancelled caller must see exactly its
    cancellation, the next one the stream's end, and the client must go on working."""
    async with (
        stoppable_server(tmp_path) as (address, pid),
        await SwapClient.connect(address, TOKENS["alice"], timeout=30.0) as client,
    ):
        area = await client.swapon("vm1", 8 * PS)
        await area.write_batch([0], [memoryview(pattern(6, 1))])
        os.kill(pid, signal.SIGSTOP)
        # 4 MiB: more than HTTP/2 lets out unacknowledged, so the write waits.
        writer = asyncio.ensure_future(area.write_batch(list(range(8)), [memoryview(bytes(8 * PS))] * 128))
        await asyncio.sleep(0.2)
        queued = [asyncio.ensure_future(area.discard_batch([i])) for i in (1, 2)]
        await asyncio.sleep(0.2)
        assert not writer.done() and not any(q.done() for q in queued)
        writer.cancel()
        queued[0].cancel()
        results = await asyncio.gather(writer, *queued, return_exceptions=True)
        os.kill(pid, signal.SIGCONT)
        assert [type(r) for r in results] == [
            asyncio.CancelledError,
            asyncio.CancelledError,
            ConnectionLost,
        ]
        into = bytearray(PS)
        await area.read_batch([0], [memoryview(into)])
        assert into == pattern(6, 1)


async def test_a_failing_medium_is_internal_on_both_paths_and_the_server_goes_on(
    srv: Running, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is not mocked for the rest: only its read, made to fail as a dying disk
    would (EIO), to see what a caller is told -- the same on a unary call and in-band."""
    handle = await attach(srv.address)
    stream = RawStream(channel, "alice")
    assert (await stream.ask(swap_out(handle, [1], pattern(1, 1))))[0] == OK
    (area,) = srv.server.manager._areas.values()

    def dying_disk(slots: object, wait: bool = True) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(area.backing, "read", dying_disk)
    code, message, pages = await stream.ask(swap_in(handle, [1]))
    assert (code, message, pages) == (
        grpc.StatusCode.INTERNAL.value[0],
        "internal error; see the server log",
        b"",
    )
    async with stub_for(srv.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SwapIn(swap_pb2.SwapInRequest(handle=handle, slots=[1]), metadata=auth("alice"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "internal error; see the server log"
    monkeypatch.undo()
    assert await stream.ask(swap_in(handle, [1])) == (OK, "", pattern(1, 1))  # the same stream, still there
    assert srv.metric("netswap_rpc_duration_seconds_count", {"method": "SwapIn", "code": "INTERNAL"}) == 2
