"""Hostile neighbours, one bound at a time: what each limit does, not how fast (bench/neighbours.py).

Callers are refused before their body is read; bodies are decoded within
bounds; a principal's calls, streams and areas are counted against it alone;
a flood of bad tokens is summarised in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from netswap.client import SwapClient
from netswap.client.errors import ConnectionLost
from netswap.common import pagewire
from netswap.common.limits import max_message_bytes
from netswap.server import handlers
from netswap.server.fairshare import WINDOW, FairShare
from netswap.v1 import swap_pb2, swap_pb2_grpc
from tests.helpers import PS, TOKENS, Running, auth, running_server, stub_for

SWAP_OUT = "/netswap.v1.SwapService/SwapOut"
MANY_FIELDS = b"\x10\x00" * 1_000_000  # a million one-byte slot fields (unpacked): 2 MB


class H2Call:
    """One call made by hand over HTTP/2: its headers now, its body only if told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()

    @classmethod
    async def open(cls, address: str, path: str, token: str | None) -> H2Call:
        host, _, port = address.rpartition(":")
        call = cls(*await asyncio.open_connection(host, int(port)))
        headers = [
            (":method", "POST"), (":scheme", "http"), (":authority", address), (":path", path),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        call.h2.send_headers(1, headers)
        await call.flush()
        return call

    async def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    async def send_part(self, announced: int, data: bytes) -> None:
        """A gRPC message frame announcing `announced` bytes, of which only `data` comes."""
        self.h2.send_data(1, b"\x00" + announced.to_bytes(4, "big") + data)
        await self.flush()

    async def status(self) -> tuple[int, str]:
        """The call's grpc-status and grpc-message, once the server sends them."""
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise AssertionError("connection closed without a status")
            for event in self.h2.receive_data(data):
                headers = getattr(event, "headers", None)
                if headers:
                    got = {k.decode() if isinstance(k, bytes) else k: v for k, v in headers}
                    status = got.get("grpc-status")
                    if status is not None:
                        message = got.get("grpc-message", "")
                        return int(status), message.decode() if isinstance(message, bytes) else message
            await self.flush()  # window updates, pings

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def tcp_server(tmp_path: Path, store: str = "memory", **overrides: Any) -> AsyncIterator[Running]:
    async with running_server(tmp_path, store, **overrides) as srv:
        yield srv


async def test_an_unauthenticated_call_is_refused_before_its_body_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes: list[int] = []
    real = pagewire.decode_swap_out

    def counted(*args: Any) -> Any:
        decodes.append(1)
        return real(*args)

    monkeypatch.setattr(handlers, "decode_swap_out", counted)  # the name the handlers call
    async with tcp_server(tmp_path) as srv:
        # Headers only, the body announced and never sent: refused all the same.
        for token in (None, "not-a-token"):
            call = await H2Call.open(srv.address, SWAP_OUT, token)
            await call.send_part(len(MANY_FIELDS), MANY_FIELDS[:1000])
            code, message = await asyncio.wait_for(call.status(), 10)
            assert code == grpc.StatusCode.UNAUTHENTICATED.value[0], message
            call.close()
        # A whole hostile body from a real client: the same, and never decoded.
        async with grpc.aio.insecure_channel(
            srv.address, options=[("grpc.max_send_message_length", 4 << 20)]
        ) as channel:
            swap_out = channel.unary_unary(SWAP_OUT, None, None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await swap_out(MANY_FIELDS, metadata=(("authorization", "Bearer nope"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert decodes == []


async def test_a_body_with_more_fields_than_any_request_is_refused_after_counting_few(tmp_path: Path) -> None:
    async with (
        tcp_server(tmp_path, max_batch_pages=256) as srv,
        grpc.aio.insecure_channel(
            srv.address, options=[("grpc.max_send_message_length", 4 << 20)]
        ) as channel,
    ):
        assert len(MANY_FIELDS) < 2 * max_message_bytes(256)  # within gRPC's size limit: it reaches us
        for method in ("SwapOut", "SwapIn", "Discard", "SwapOn"):
            call = channel.unary_unary(f"/netswap.v1.SwapService/{method}", None, None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(MANY_FIELDS, metadata=auth("alice"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert "more than any valid one" in (err.value.details() or ""), method


async def test_a_body_that_never_arrives_times_out_and_counts_against_its_principal(tmp_path: Path) -> None:
    async with tcp_server(tmp_path, request_timeout=1.0, max_calls_per_principal=1) as srv:
        stalled = await H2Call.open(srv.address, SWAP_OUT, TOKENS["alice"])
        await stalled.send_part(4096, b"\x0a\x10")
        await asyncio.sleep(0.2)
        async with stub_for(srv.address) as stub:
            # alice's one call is taken; bob is not held up by it
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 calls in progress" in (err.value.details() or "")
            await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("bob"))
            code, message = await asyncio.wait_for(stalled.status(), 10)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert "did not arrive within 1s" in message
            stalled.close()
            await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))  # its place is free


async def test_page_streams_are_counted_per_principal(tmp_path: Path) -> None:
    async with tcp_server(tmp_path, max_streams_per_principal=2) as srv:
        clients = [await SwapClient.connect(srv.address, TOKENS["alice"]) for _ in range(3)]
        try:
            areas = [await c.swapon(f"a{i}", 16 * PS) for i, c in enumerate(clients)]
            for area in areas[:2]:  # each client's page traffic is one PageStream
                await area.swap_out(range(0, 1), bytes(PS))
            # Refused with RESOURCE_EXHAUSTED, which the client takes as "retry later".
            with pytest.raises(ConnectionLost, match=r"2 open PageStreams.*RESOURCE_EXHAUSTED"):
                await areas[2].swap_out(range(0, 1), bytes(PS))
            async with await SwapClient.connect(srv.address, TOKENS["bob"]) as bob:
                await (await bob.swapon("b", 16 * PS)).swap_out(range(0, 1), bytes(PS))
            await clients[0].close()  # a stream ends: its place is free
            for _ in range(50):
                with contextlib.suppress(ConnectionLost):
                    await areas[2].swap_out(range(0, 1), bytes(PS))
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the closed stream's place never came free")
        finally:
            for c in clients[1:]:
                await c.close()


async def test_connections_past_the_limit_are_refused(tmp_path: Path) -> None:
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, not one shared
    request = swap_pb2.ListAreasRequest()
    async with tcp_server(tmp_path, max_connections=1) as srv:
        async with grpc.aio.insecure_channel(srv.address, options=own) as first:
            await swap_pb2_grpc.SwapServiceStub(first).ListAreas(request, metadata=auth("alice"))
            async with grpc.aio.insecure_channel(srv.address, options=own) as second:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await swap_pb2_grpc.SwapServiceStub(second).ListAreas(
                        request, metadata=auth("bob"), timeout=5
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for _ in range(50):  # the first has gone: room again, once the server has seen it go
            async with grpc.aio.insecure_channel(srv.address, options=own) as third:
                try:
                    await swap_pb2_grpc.SwapServiceStub(third).ListAreas(
                        request, metadata=auth("bob"), timeout=5
                    )
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("no room for a connection after the first one closed")


async def test_a_flood_of_bad_tokens_is_audited_as_summaries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="netswap.audit")
    async with tcp_server(tmp_path, auth_failure_burst=3, auth_failure_rate=0.001) as srv:
        async with stub_for(srv.address) as stub:
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListAreas(
                        swap_pb2.ListAreasRequest(), metadata=(("authorization", "Bearer x"),)
                    )
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.ListAreas(
                swap_pb2.ListAreasRequest(), metadata=auth("alice")
            )  # a good token still works
        assert srv.metric("netswap_auth_failures_total", {"reason": "unknown_token"}) == 20
        assert srv.metric("netswap_auth_failures_folded_total") == 17
        srv.server.gate.flush()
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "netswap.audit"]
    one_by_one = [r for r in records if r["event"] == "authn_failure"]
    summaries = [r for r in records if r["event"] == "authn_failure_summary"]
    assert len(one_by_one) == 3
    assert [(s["failures"], s["reasons"], s["peer"]) for s in summaries] == [
        (17, {"unknown_token": 17}, "ipv4:127.0.0.1")
    ]


async def test_a_principal_over_its_share_of_the_loop_waits_its_turn() -> None:
    fair = FairShare()
    assert fair.turn("bob") is None  # an idle server: nobody waits
    fair.used("bob", WINDOW, waited=False)  # bob kept the loop busy for a whole window...
    fair.used("alice", WINDOW / 50, waited=False)  # ...while alice used a little of it
    assert fair.turn("alice") is None  # within her share: at once
    first, second = fair.turn("bob"), fair.turn("bob")
    carol = fair.turn("carol")  # never seen: within any share
    assert first is not None and second is not None and carol is None
    await asyncio.sleep(0)
    assert first.done() and not second.done()  # one of bob's at a time...
    fair.used("bob", 0.001, waited=True)
    await asyncio.sleep(0)
    assert second.done()  # ...the next once the previous is over
    fair.used("bob", 0.001, waited=True)
    await asyncio.sleep(0)
    assert fair.deferred == 2


async def test_orphaned_areas_are_counted_logged_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens.toml"
    async with running_server(tmp_path, "file") as srv:
        for who in ("alice", "bob"):
            async with await SwapClient.connect(srv.address, TOKENS[who]) as client:
                area = await client.swapon("vm", 8 * PS)
                await area.swap_out(range(0, 2), bytes(2 * PS))
                area.detach()
        assert srv.metric("netswap_orphaned_areas") == 0
        text = tokens.read_text()
        tokens.write_text(text[text.index("[principals.bob]") :])  # alice removed
        await srv.server.reload()
        assert srv.metric("netswap_orphaned_areas") == 1
        assert srv.metric("netswap_orphaned_bytes") == 8 * PS
        assert "area 'vm' of principal 'alice'" in caplog.text and "not name" in caplog.text
        assert srv.server.manager.area_count() == 2  # never deleted on its own
