"""Hostile input, all at once: exact status codes, nothing touched outside the store, server still up.

Principal bob attacks principal alice's area on a file-store server whose
root sits next to a directory of unrelated files; afterwards alice's data is
intact, nothing outside the store root changed, and the server answers.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from netswap.v1 import swap_pb2, swap_pb2_grpc
from tests.helpers import PS, Running, auth, pattern, running_server, stub_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root except `skip`, with its mode, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in [*dirnames, *filenames]:
            st = os.lstat(Path(dirpath, name))
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


async def expect(code: grpc.StatusCode, call: Awaitable[object], words: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, (err.value.code(), err.value.details())
    assert words in (err.value.details() or "")


async def test_attack_suite(tmp_path: Path) -> None:
    bystander = tmp_path / "unrelated"
    bystander.mkdir()
    (bystander / "a").write_text("keep me")
    (tmp_path / "a").write_text("and me")
    store = tmp_path / "store"
    async with (
        running_server(tmp_path, f"file:{store}", health_listen="127.0.0.1:0") as srv,
        stub_for(srv.address) as stub,
    ):
        before = snapshot(tmp_path, store)
        A, B = auth("alice"), auth("bob")
        a = await stub.SwapOn(swap_pb2.SwapOnRequest(name="a", size_bytes=1 << 20), metadata=A)
        secret = pattern(42, 4)
        await stub.SwapOut(
            swap_pb2.SwapOutRequest(handle=a.handle, slots=[0, 1, 2, 3], pages=secret), metadata=A
        )
        b = await stub.SwapOn(swap_pb2.SwapOnRequest(name="b", size_bytes=1 << 20), metadata=B)

        # bob guesses handles, then replays alice's
        for guess in [os.urandom(16) for _ in range(50)] + [a.handle[:-1], a.handle + b"\0", b"\0" * 16]:
            await expect(NOT_FOUND, stub.SwapIn(swap_pb2.SwapInRequest(handle=guess, slots=[0]), metadata=B))
        for call in (
            stub.SwapIn(swap_pb2.SwapInRequest(handle=a.handle, slots=[0]), metadata=B),
            stub.SwapOut(swap_pb2.SwapOutRequest(handle=a.handle, slots=[0], pages=bytes(PS)), metadata=B),
            stub.Discard(swap_pb2.DiscardRequest(handle=a.handle, slots=[0]), metadata=B),
            stub.SwapOff(swap_pb2.SwapOffRequest(handle=a.handle), metadata=B),
        ):
            await expect(NOT_FOUND, call, "unknown handle")

        # names that try to become paths, or are not names at all
        for name in ("../a", "../../unrelated/a", "a/b", "/a", "a" * 65, "nul\0", "ünïcode", "", " ", "a\nb"):
            await expect(
                INVALID, stub.SwapOn(swap_pb2.SwapOnRequest(name=name, size_bytes=PS), metadata=B), "name"
            )

        # sizes
        for size in (0, 1, PS - 1, 2**64 - 1, 2**63, (32 << 20) + PS):
            await expect(
                INVALID,
                stub.SwapOn(swap_pb2.SwapOnRequest(name="s", size_bytes=size), metadata=B),
                "size_bytes",
            )

        # slots and blobs on bob's own area
        def out(slots: list[int], pages: bytes) -> Awaitable[object]:
            return stub.SwapOut(
                swap_pb2.SwapOutRequest(handle=b.handle, slots=slots, pages=pages), metadata=B
            )

        await expect(INVALID, out([2**64 - 1], bytes(PS)), "out of range")
        await expect(INVALID, out([256], bytes(PS)), "out of range")
        await expect(INVALID, out([5, 5], bytes(2 * PS)), "more than once")
        await expect(INVALID, out([1, 2], bytes(2 * PS - 1)), "8191 bytes")
        await expect(INVALID, out([1, 2], bytes(2 * PS + 1)), "8193 bytes")
        many = list(range(10_000))
        await expect(INVALID, out(many, b""), "exceed max_batch_pages")
        await expect(
            INVALID, stub.SwapIn(swap_pb2.SwapInRequest(handle=b.handle, slots=many), metadata=B), "exceed"
        )
        await expect(
            INVALID, stub.Discard(swap_pb2.DiscardRequest(handle=b.handle, slots=many), metadata=B), "exceed"
        )
        await expect(
            EXHAUSTED, out([0], bytes(4 << 20))
        )  # over twice the largest valid message: gRPC's own limit

        # empty requests
        await expect(INVALID, stub.SwapOn(swap_pb2.SwapOnRequest(), metadata=B), "name")
        for call in (
            stub.SwapOut(swap_pb2.SwapOutRequest(), metadata=B),
            stub.SwapIn(swap_pb2.SwapInRequest(), metadata=B),
            stub.Discard(swap_pb2.DiscardRequest(), metadata=B),
            stub.SwapOff(swap_pb2.SwapOffRequest(), metadata=B),
        ):
            await expect(INVALID, call, "handle is empty")
        assert (await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=B)).areas[0].name == "b"

        # wrong-typed or wrong-shaped credentials
        for metadata in (
            (("authorization-bin", b"Bearer " + b"x" * 10),),
            (("authorization", "Basic YWxpY2U="),),
            (("authorization", "Bearer"),),
            (("x-token", "alice-token-0123456789"),),
        ):
            await expect(UNAUTHENTICATED, stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=metadata))

        # bytes that are not a message at all
        async with grpc.aio.insecure_channel(srv.address) as channel:
            raw: Callable[..., Awaitable[object]] = channel.unary_unary(
                "/netswap.v1.SwapService/SwapIn", None, None
            )
            await expect(INVALID, raw(b"\xff\xff\xff\xff\x0f", metadata=B), "malformed SwapIn request")
            await expect(UNAUTHENTICATED, raw(b"\xff\xff\xff\xff\x0f"))  # who you are comes first

        # afterwards: alice's data intact, nothing outside the store touched, server up
        got = await stub.SwapIn(swap_pb2.SwapInRequest(handle=a.handle, slots=[0, 1, 2, 3]), metadata=A)
        assert got.pages == secret
        await check_up(srv)
    assert snapshot(tmp_path, store) == before
    assert all(p.resolve().is_relative_to(store.resolve()) for p in store.rglob("*"))


async def check_up(srv: Running) -> None:
    assert srv.server.health_address is not None
    async with grpc.aio.insecure_channel(srv.server.health_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(srv.address) as channel:
        listed = await swap_pb2_grpc.SwapServiceStub(channel).ListAreas(
            swap_pb2.ListAreasRequest(), metadata=auth("alice")
        )
        assert [x.name for x in listed.areas] == ["a"]


async def test_refused_bodies_are_let_go_with_their_calls(tmp_path: Path) -> None:
    # Without the GC: a request kept by a reference cycle (a generator, a traceback) would
    # stay until the next collection, and a burst of big refused bodies with it.
    size = 1_000_002  # a length no other bytes object here has
    malformed = b"\x10\x00" * (size // 2)  # one-byte fields: refused before it is parsed
    async with running_server(tmp_path) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = swap_pb2_grpc.SwapServiceStub(channel)
        a = await stub.SwapOn(swap_pb2.SwapOnRequest(name="a", size_bytes=1 << 20), metadata=auth("alice"))
        swap_out = channel.unary_unary("/netswap.v1.SwapService/SwapOut", None, None)  # bytes as they are
        page_stream = channel.stream_stream("/netswap.v1.SwapService/PageStream", None, None)
        gc.disable()
        try:
            for _ in range(4):
                await expect(INVALID, swap_out(malformed, metadata=auth("alice")))
            stream = page_stream(None, metadata=auth("alice"))
            await stream.write(malformed)
            reply = await stream.read()
            assert isinstance(reply, bytes) and swap_pb2.PageReply.FromString(reply).code != 0
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
            held = [
                type(o).__name__
                for o in gc.get_objects()
                for r in gc.get_referents(o)
                if type(r) is bytes and len(r) == size and r is not malformed
            ]
            assert held == []
        finally:
            gc.enable()
        await stub.SwapOff(swap_pb2.SwapOffRequest(handle=a.handle), metadata=auth("alice"))
