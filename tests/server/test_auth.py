"""Credential context: every call is authenticated; no principal can touch another's areas."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from netswap.server.auth import TokensError, TokenTable, bearer_token
from netswap.v1 import swap_pb2
from tests.helpers import PS, Running, auth, pattern, running_server, stub_for

NO_AUTH: tuple[tuple[str, str], ...] = ()
CALLS = {
    "SwapOn": swap_pb2.SwapOnRequest(name="x", size_bytes=PS),
    "SwapOut": swap_pb2.SwapOutRequest(handle=b"h", slots=[0], pages=bytes(PS)),
    "SwapIn": swap_pb2.SwapInRequest(handle=b"h", slots=[0]),
    "Discard": swap_pb2.DiscardRequest(handle=b"h", slots=[0]),
    "SwapOff": swap_pb2.SwapOffRequest(handle=b"h"),
    "ListAreas": swap_pb2.ListAreasRequest(),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (NO_AUTH, "missing_token"),
        ((("authorization", "Bearer wrong-token"),), "unknown_token"),
        ((("authorization", "Basic YWxpY2U6eA=="),), "missing_token"),
        ((("authorization", "Bearer "),), "missing_token"),
        ((("authorization", "alice-token-0123456789"),), "missing_token"),
    ],
)
async def test_unauthenticated_calls_never_reach_a_handler(
    srv: Running, method: str, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    async with stub_for(srv.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, method)(CALLS[method], metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert srv.server.manager.area_count() == 0
    assert srv.metric("netswap_auth_failures_total", {"reason": reason}) == 1
    assert (
        srv.metric("netswap_rpc_duration_seconds_count", {"method": method, "code": "UNAUTHENTICATED"}) == 1
    )


async def test_health_needs_no_token(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, health_listen="127.0.0.1:0") as srv,
        grpc.aio.insecure_channel(srv.server.health_address or "") as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "netswap.v1.SwapService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_other_principal_cannot_touch_an_area_even_with_its_handle(srv: Running) -> None:
    async with stub_for(srv.address) as stub:
        a = await stub.SwapOn(
            swap_pb2.SwapOnRequest(name="secret", size_bytes=1 << 20), metadata=auth("alice")
        )
        data = pattern(1, 2)
        await stub.SwapOut(
            swap_pb2.SwapOutRequest(handle=a.handle, slots=[0, 1], pages=data),
            metadata=auth("alice"),
        )

        bob = auth("bob")
        attempts: list[Awaitable[object]] = [
            stub.SwapIn(swap_pb2.SwapInRequest(handle=a.handle, slots=[0]), metadata=bob),
            stub.SwapOut(swap_pb2.SwapOutRequest(handle=a.handle, slots=[0], pages=bytes(PS)), metadata=bob),
            stub.Discard(swap_pb2.DiscardRequest(handle=a.handle, slots=[0, 1]), metadata=bob),
            stub.SwapOff(swap_pb2.SwapOffRequest(handle=a.handle), metadata=bob),
        ]
        for attempt in attempts:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attempt
            # exactly what a handle that never existed gets: no existence oracle
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert (
                err.value.details() == "unknown handle (expired by SwapOff, re-attach, or a server restart)"
            )

        # bob's SwapOn of the same name makes bob's own area; alice's is untouched
        b = await stub.SwapOn(swap_pb2.SwapOnRequest(name="secret", size_bytes=2 << 20), metadata=bob)
        assert b.created
        assert (
            await stub.SwapIn(swap_pb2.SwapInRequest(handle=b.handle, slots=[0]), metadata=bob)
        ).pages == bytes(PS)
        listed = await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=bob)
        assert [(x.name, x.size_bytes, x.pages_stored) for x in listed.areas] == [("secret", 2 << 20, 0)]

        # alice's area, handle and data are all intact
        got = await stub.SwapIn(swap_pb2.SwapInRequest(handle=a.handle, slots=[0, 1]), metadata=auth("alice"))
        assert got.pages == data
        listed = await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))
        assert [(x.name, x.size_bytes, x.pages_stored) for x in listed.areas] == [("secret", 1 << 20, 2)]


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer abc"),)) == "abc"
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not toml [", "cannot read tokens file"),
        ("x = 1", "expected a [principals.NAME] table"),
        ('[principals."a/b"]\ntoken_sha256 = "' + "0" * 64 + '"', "name must be"),
        ("[principals.a]\ntoken_sha256 = 'abc'", "64 hex digits"),
        ("[principals.a]\ntoken_sha256 = '" + "0" * 64 + "'\nquota_bytes = -1", "quota_bytes"),
        (
            "[principals.a]\ntoken_sha256 = '"
            + "0" * 64
            + "'\n[principals.b]\ntoken_sha256 = '"
            + "0" * 64
            + "'",
            "also used",
        ),
    ],
)
def test_bad_tokens_files_are_refused_clearly(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(TokensError, match=words.replace("[", r"\[")):
        TokenTable.load(path)
