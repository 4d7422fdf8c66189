"""SwapOut / SwapIn / Discard / SwapOff through the raw gRPC API, with exact status codes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from netswap.server.errors import InvalidArgument
from netswap.v1 import swap_pb2, swap_pb2_grpc
from tests.helpers import PS, Running, auth, pattern, running_server, stored_files, stub_for


@dataclass
class Attached:
    stub: swap_pb2_grpc.SwapServiceAsyncStub
    handle: bytes
    slots: int

    async def out(self, slots: Sequence[int], pages: bytes, who: str = "alice") -> None:
        await self.stub.SwapOut(
            swap_pb2.SwapOutRequest(handle=self.handle, slots=slots, pages=pages),
            metadata=auth(who),
        )

    async def get(self, slots: Sequence[int], who: str = "alice") -> bytes:
        reply = await self.stub.SwapIn(
            swap_pb2.SwapInRequest(handle=self.handle, slots=slots), metadata=auth(who)
        )
        return reply.pages

    async def discard(self, slots: Sequence[int], who: str = "alice") -> None:
        await self.stub.Discard(swap_pb2.DiscardRequest(handle=self.handle, slots=slots), metadata=auth(who))


@pytest.fixture
async def area(srv: Running) -> AsyncIterator[Attached]:
    async with stub_for(srv.address) as stub:
        reply = await stub.SwapOn(
            swap_pb2.SwapOnRequest(name="vm1", size_bytes=1 << 20), metadata=auth("alice")
        )
        yield Attached(stub, reply.handle, reply.slot_count)


async def code_of(coro: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


async def test_pages_come_back_in_request_order(area: Attached) -> None:
    slots = [7, 3, 4, 5, 255, 0, 100, 101]  # runs, reversals and gaps
    data = pattern(1, len(slots))
    await area.out(slots, data)
    assert await area.get(slots) == data
    # any other order and subset
    back = [101, 0, 5, 3]
    expected = b"".join(data[slots.index(s) * PS : (slots.index(s) + 1) * PS] for s in back)
    assert await area.get(back) == expected


async def test_unwritten_slots_read_as_zeros(area: Attached) -> None:
    await area.out([1], pattern(2, 1))
    got = await area.get([0, 1, 2])
    assert got[:PS] == bytes(PS) and got[2 * PS :] == bytes(PS)


async def test_discard_reads_zeros_and_keeps_reservation(srv: Running, area: Attached) -> None:
    data = pattern(3, 4)
    await area.out([10, 11, 12, 13], data)
    await area.discard([11, 12])
    got = await area.get([10, 11, 12, 13])
    assert got == data[:PS] + bytes(2 * PS) + data[3 * PS :]
    reserved = srv.server.manager.reserved_bytes
    assert reserved == 1 << 20
    stats = srv.server.manager.list_areas("alice")
    assert stats[0].pages_stored == 2
    # rewriting a discarded slot works and shows again
    await area.out([11], pattern(4, 1))
    assert await area.get([11]) == pattern(4, 1)
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 3


async def test_overwrite_counts_once(srv: Running, area: Attached) -> None:
    await area.out([0, 1], pattern(5, 2))
    await area.out([1, 0], pattern(6, 2))
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 2
    assert await area.get([1, 0]) == pattern(6, 2)


async def test_full_batch_at_the_limit(srv: Running, area: Attached) -> None:
    n = srv.config.max_batch_pages
    slots = list(range(n - 1, -1, -1))
    data = pattern(7, n)
    await area.out(slots, data)
    assert await area.get(slots) == data


BAD_WRITES = [
    # (slots, pages, code, words in the message)
    ([256], pattern(0, 1), grpc.StatusCode.INVALID_ARGUMENT, "slot 256 out of range"),
    ([2**64 - 1], pattern(0, 1), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    ([1, 2, 1], pattern(0, 3), grpc.StatusCode.INVALID_ARGUMENT, "slot 1 appears more than once"),
    ([1, 2], pattern(0, 2)[:-1], grpc.StatusCode.INVALID_ARGUMENT, "8191 bytes"),
    ([1, 2], pattern(0, 2) + b"x", grpc.StatusCode.INVALID_ARGUMENT, "8193 bytes"),
    ([1], b"", grpc.StatusCode.INVALID_ARGUMENT, "0 bytes"),
    ([], b"", grpc.StatusCode.INVALID_ARGUMENT, "slots is empty"),
    ([], pattern(0, 1), grpc.StatusCode.INVALID_ARGUMENT, "slots is empty"),
]


@pytest.mark.parametrize(("slots", "pages", "code", "words"), BAD_WRITES)
async def test_bad_swap_out_is_refused_and_writes_nothing(
    srv: Running, area: Attached, slots: list[int], pages: bytes, code: grpc.StatusCode, words: str
) -> None:
    before = pattern(8, 3)
    await area.out([0, 1, 2], before)
    got_code, details = await code_of(area.out(slots, pages))
    assert got_code == code
    assert words in details
    assert await area.get([0, 1, 2]) == before
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 3


async def test_batch_over_the_limit_is_refused(srv: Running, area: Attached) -> None:
    n = srv.config.max_batch_pages + 1
    code, details = await code_of(area.out(list(range(n)), pattern(1, n)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"exceed max_batch_pages {n - 1}" in details
    # one slot with a blob of many pages: the blob length is named
    code, details = await code_of(area.out([0], pattern(1, n)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{n * PS} bytes" in details
    # past twice the largest valid message gRPC itself refuses to buffer it
    big = 3 * srv.config.max_batch_pages
    code, details = await code_of(area.out([0], pattern(1, big)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details = await code_of(area.discard(list(range(n))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"exceed max_batch_pages {n - 1}" in details
    code, details = await code_of(area.get(list(range(n))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("op", ["get", "discard"])
@pytest.mark.parametrize(
    ("slots", "words"),
    [([256], "out of range"), ([3, 3], "more than once"), ([], "slots is empty")],
)
async def test_bad_slots_on_read_and_discard(area: Attached, op: str, slots: list[int], words: str) -> None:
    code, details = await code_of(getattr(area, op)(slots))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details


async def test_swapon_says_the_server_takes_runs(srv: Running) -> None:
    async with stub_for(srv.address) as stub:
        reply = await stub.SwapOn(
            swap_pb2.SwapOnRequest(name="r", size_bytes=1 << 20), metadata=auth("alice")
        )
    assert reply.takes_runs


async def test_a_run_names_the_same_slots_as_their_list(srv: Running, area: Attached) -> None:
    data = pattern(3, 5)
    md = auth("alice")
    await area.stub.SwapOut(
        swap_pb2.SwapOutRequest(handle=area.handle, run_start=250, run_count=5, pages=data), metadata=md
    )  # the last slots of the area: 250..254
    assert await area.get([250, 251, 252, 253, 254]) == data
    await area.out([10, 11, 12], pattern(4, 3))
    got = await area.stub.SwapIn(
        swap_pb2.SwapInRequest(handle=area.handle, run_start=9, run_count=5), metadata=md
    )
    assert got.pages == bytes(PS) + pattern(4, 3) + bytes(PS)
    await area.stub.Discard(
        swap_pb2.DiscardRequest(handle=area.handle, run_start=11, run_count=2), metadata=md
    )
    assert await area.get([10, 11, 12]) == pattern(4, 3)[:PS] + bytes(2 * PS)
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 6


BAD_RUNS = [
    # (fields naming the slots, pages, words in the message)
    ({"run_start": 255, "run_count": 2}, pattern(0, 2), "slot 256 out of range"),
    ({"run_start": 2**64 - 1, "run_count": 1}, pattern(0, 1), "out of range"),
    ({"run_start": 0, "run_count": 2**32 - 1}, pattern(0, 1), "exceed max_batch_pages"),
    ({"run_start": 1, "run_count": 1, "slots": [1]}, pattern(0, 1), "not both"),
    ({"run_start": 1, "run_count": 2}, pattern(0, 1), "4096 bytes; 2 slots need exactly 8192"),
    ({"run_start": 5}, pattern(0, 1), "run_start 5 without run_count"),
    ({"run_start": 5, "slots": [5]}, pattern(0, 1), "run_start 5 without run_count"),
    ({"run_count": 0}, pattern(0, 1), "slots is empty and no run is given"),
]


@pytest.mark.parametrize(("fields", "pages", "words"), BAD_RUNS)
async def test_bad_run_is_refused_and_changes_nothing(
    srv: Running, area: Attached, fields: dict[str, Any], pages: bytes, words: str
) -> None:
    before = pattern(8, 3)
    await area.out([0, 1, 2], before)
    md = auth("alice")
    requests: list[tuple[str, Any]] = [
        ("SwapOut", swap_pb2.SwapOutRequest(handle=area.handle, pages=pages, **fields)),
        ("SwapIn", swap_pb2.SwapInRequest(handle=area.handle, **fields)),
        ("Discard", swap_pb2.DiscardRequest(handle=area.handle, **fields)),
    ]
    if "bytes" in words:
        requests = requests[:1]  # a blob of the wrong length: only SwapOut carries one
    for method, request in requests:
        code, details = await code_of(getattr(area.stub, method)(request, metadata=md))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert words in details, method
    assert await area.get([0, 1, 2]) == before
    assert srv.server.manager.list_areas("alice")[0].pages_stored == 3


@pytest.mark.parametrize("fields", [{"run_start": 1, "run_count": 1, "slots": [1]}, {"run_start": 1}])
async def test_a_misnamed_request_with_a_bad_handle_is_not_found_as_any_other(
    srv: Running, area: Attached, fields: dict[str, Any]
) -> None:
    # The handle is checked first: a bad handle is NOT_FOUND whatever else is wrong.
    async with stub_for(srv.address) as stub:
        bobs = (
            await stub.SwapOn(swap_pb2.SwapOnRequest(name="b", size_bytes=PS), metadata=auth("bob"))
        ).handle
    for handle in (b"x" * 16, bobs):
        request = swap_pb2.SwapInRequest(handle=handle, **fields)
        code, _ = await code_of(area.stub.SwapIn(request, metadata=auth("alice")))
        assert code == grpc.StatusCode.NOT_FOUND


async def test_the_manager_refuses_negative_slots_from_in_process_callers(
    srv: Running, area: Attached
) -> None:
    # The wire's slots are unsigned; a negative one from Python would index from the end.
    manager = srv.server.manager
    await area.out([255], pattern(5, 1))
    for slots in (range(-1, 1), [-1], [3, -2, 7]):
        with pytest.raises(InvalidArgument, match="out of range"):
            await manager.swap_out(
                manager.attached("alice", area.handle, "SwapOut"), slots, memoryview(pattern(0, len(slots)))
            )
        with pytest.raises(InvalidArgument, match="out of range"):
            await manager.swap_in(manager.attached("alice", area.handle, "SwapIn"), slots)
    assert await area.get([255]) == pattern(5, 1)
    assert manager.list_areas("alice")[0].pages_stored == 1


async def test_a_swap_out_taken_later_is_counted_read_and_kept_by_the_manager(
    srv: Running, area: Attached
) -> None:
    # PageStream hands SwapOuts over `later` (the memory store copies once the
    # reply is sent): listing, reading and settling all see them, and a
    # swapoff with one pending loses nothing that outlives the area.
    manager = srv.server.manager
    await manager.swap_out(
        manager.attached("alice", area.handle, "SwapOut"), range(0, 2), memoryview(pattern(1, 2)), later=True
    )
    assert manager.list_areas("alice")[0].pages_stored == 2
    await manager.swap_out(
        manager.attached("alice", area.handle, "SwapOut"), [9], memoryview(pattern(2, 1)), later=True
    )
    assert (
        b"".join(await manager.swap_in(manager.attached("alice", area.handle, "SwapIn"), [9, 0]))
        == pattern(2, 1) + pattern(1, 2)[:PS]
    )
    await manager.swap_out(
        manager.attached("alice", area.handle, "SwapOut"), [10], memoryview(pattern(3, 1)), later=True
    )
    manager.settle()
    assert await area.get([10]) == pattern(3, 1)
    await manager.swap_out(
        manager.attached("alice", area.handle, "SwapOut"), [11], memoryview(pattern(4, 1)), later=True
    )
    await manager.swapoff("alice", area.handle)
    manager.settle()  # the area is gone: nothing to copy, nothing raised
    assert manager.list_areas("alice") == []


async def test_a_copy_that_fails_fails_its_own_area_and_no_one_else(
    srv: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Any stream settles every pending copy after its reply, other principals'
    # too (AreaManager.settle). A copy that failed -- a dying medium -- must
    # not fail that stream, and must not be lost: its own area keeps failing.
    manager = srv.server.manager
    alice = (await manager.swapon("alice", "a", 16 * PS)).handle
    bob = (await manager.swapon("bob", "b", 16 * PS)).handle
    (area,) = [a for a in manager._areas.values() if a.key.owner == "alice"]

    def dying_medium() -> None:
        raise OSError(5, "Input/output error")

    await manager.swap_out(
        manager.attached("alice", alice, "SwapOut"), [1], memoryview(pattern(1, 1)), later=True
    )
    monkeypatch.setattr(area.backing, "settle", dying_medium)
    await manager.swap_out(
        manager.attached("bob", bob, "SwapOut"), [2], memoryview(pattern(2, 1)), later=True
    )
    manager.settle()  # as bob's stream does after its reply: logged, not raised
    if srv.store_root is None:  # (the file store writes before it answers: nothing was pending)
        assert "could not finish an acknowledged SwapOut's copy" in caplog.text
    assert b"".join(await manager.swap_in(manager.attached("bob", bob, "SwapIn"), [2])) == pattern(2, 1)
    if srv.store_root is None:  # the memory store copies later: alice's area fails until it can
        with pytest.raises(OSError):
            await manager.swap_in(manager.attached("alice", alice, "SwapIn"), [1])
    monkeypatch.undo()
    assert b"".join(await manager.swap_in(manager.attached("alice", alice, "SwapIn"), [1])) == pattern(1, 1)


@pytest.mark.parametrize(
    ("handle", "code"),
    [(b"", grpc.StatusCode.INVALID_ARGUMENT), (b"x" * 16, grpc.StatusCode.NOT_FOUND),
     (b"\xff" * 1000, grpc.StatusCode.NOT_FOUND)],
)  # fmt: skip
async def test_bad_handles(area: Attached, handle: bytes, code: grpc.StatusCode) -> None:
    bogus = Attached(area.stub, handle, area.slots)
    for call in (bogus.out([0], pattern(0, 1)), bogus.get([0]), bogus.discard([0])):
        got, _ = await code_of(call)
        assert got == code
    got, _ = await code_of(area.stub.SwapOff(swap_pb2.SwapOffRequest(handle=handle), metadata=auth("alice")))
    assert got == code


async def test_swapoff_frees_everything_and_kills_the_handle(srv: Running, area: Attached) -> None:
    await area.out([0], pattern(9, 1))
    await area.stub.SwapOff(swap_pb2.SwapOffRequest(handle=area.handle), metadata=auth("alice"))
    assert srv.server.manager.reserved_bytes == 0
    assert srv.server.manager.list_areas("alice") == []
    if srv.store_root is not None:
        assert not stored_files(srv.store_root)
    for call in (area.get([0]), area.out([0], pattern(0, 1)), area.discard([0])):
        code, _ = await code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await code_of(
        area.stub.SwapOff(swap_pb2.SwapOffRequest(handle=area.handle), metadata=auth("alice"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # the name is free again, and the new area does not see the old data
    reply = await area.stub.SwapOn(
        swap_pb2.SwapOnRequest(name="vm1", size_bytes=1 << 20), metadata=auth("alice")
    )
    assert reply.created
    fresh = Attached(area.stub, reply.handle, reply.slot_count)
    assert await fresh.get([0]) == bytes(PS)


async def test_list_areas(srv: Running, area: Attached) -> None:
    await area.out([0, 1, 2], pattern(10, 3))
    await area.stub.SwapOn(swap_pb2.SwapOnRequest(name="aaa", size_bytes=PS), metadata=auth("alice"))
    reply = await area.stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))
    assert [(a.name, a.size_bytes, a.pages_stored) for a in reply.areas] == [
        ("aaa", PS, 0),
        ("vm1", 1 << 20, 3),
    ]


async def test_re_attaching_waits_for_what_the_old_handle_has_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write of the old handle held up in an I/O thread lands before the new
    # handle exists: nothing sent with a handle lands after it was replaced.
    async with running_server(tmp_path, "file") as srv:
        manager = srv.server.manager
        old = (await manager.swapon("alice", "vm1", 16 * PS)).handle
        (area,) = manager._areas.values()
        release = threading.Event()
        real = area.backing.write

        def held_up(*args: Any, **kwargs: Any) -> None:
            release.wait(10)
            real(*args, **kwargs)

        monkeypatch.setattr(area.backing, "write", held_up)
        late = asyncio.ensure_future(
            manager.swap_out(manager.attached("alice", old, "SwapOut"), [5], memoryview(pattern(1, 1)))
        )
        await asyncio.sleep(0.05)
        again = asyncio.ensure_future(manager.swapon("alice", "vm1", 16 * PS))
        await asyncio.sleep(0.05)
        assert not again.done()  # the fence: the old handle's write is still on its way
        release.set()
        await late
        new = (await again).handle
        monkeypatch.undo()
        await manager.swap_out(manager.attached("alice", new, "SwapOut"), [5], memoryview(pattern(2, 1)))
        assert b"".join(await manager.swap_in(manager.attached("alice", new, "SwapIn"), [5])) == pattern(2, 1)
