"""Token handling, limits and the audit log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from netswap.client import AuthenticationFailed, NoSpace, SwapClient
from netswap.server.auth import TokensError, TokenTable
from netswap.v1 import swap_pb2
from tests.helpers import PS, TOKENS, ServerProcess, auth, running_server, stub_for, write_tokens


def test_tokens_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens.toml")
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(
            TokensError, match=f"accessible to group or others \\(mode {mode:04o}\\); run: chmod 600"
        ):
            TokenTable.load(path)
    path.chmod(0o600)
    assert TokenTable.load(path).has("alice")


def test_a_principal_may_have_no_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("[principals.certonly]\nquota_bytes = 4096\n")
    path.chmod(0o600)
    table = TokenTable.load(path)
    assert table.has("certonly") and table.quota_of("certonly") == 4096
    assert table.authenticate("") is None and table.authenticate("anything") is None


async def test_sighup_reloads_tokens_and_revokes_at_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, tmp_path / "store")
    await server.astart()
    try:
        async with await SwapClient.connect(server.address, TOKENS["bob"]) as bob:
            assert await bob.list_areas() == []
            # bob is revoked: the file now lists alice only
            tokens = tmp_path / "tokens.toml"
            text = tokens.read_text()
            tokens.write_text(text[: text.index("[principals.bob]")])
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "SIGHUP: reloaded tokens file" not in server.log.read_text():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            with pytest.raises(AuthenticationFailed, match="unknown bearer token"):
                await bob.list_areas()
        async with await SwapClient.connect(server.address, TOKENS["alice"]) as alice:
            assert await alice.list_areas() == []
        # a broken file on SIGHUP keeps the table in force
        (tmp_path / "tokens.toml").write_text("this is not toml [")
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "NOT reloaded" not in server.log.read_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with await SwapClient.connect(server.address, TOKENS["alice"]) as alice:
            assert await alice.list_areas() == []
    finally:
        server.stop_quietly()


async def test_area_count_limit(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_areas_per_principal=2) as srv:
        async with await SwapClient.connect(srv.address, TOKENS["alice"]) as client:
            for name in ("a", "b"):
                (await client.swapon(name, PS)).detach()
            with pytest.raises(NoSpace, match="area limit: 2 areas exist; the server allows 2 per principal"):
                await client.swapon("c", PS)
            (await client.swapon("a", PS)).detach()  # re-attaching is not a new area
        async with await SwapClient.connect(srv.address, TOKENS["bob"]) as other:
            (await other.swapon("c", PS)).detach()  # the limit is per principal


async def test_swapon_rate_limit(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, swapon_rate=1.0, swapon_burst=3) as srv,
        stub_for(srv.address) as stub,
    ):
        request = swap_pb2.SwapOnRequest(name="a", size_bytes=PS)
        for _ in range(3):
            await stub.SwapOn(request, metadata=auth("alice"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SwapOn(request, metadata=auth("alice"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "SwapOn rate limit" in (err.value.details() or "")
        await stub.SwapOn(request, metadata=auth("bob"))  # per principal
        await asyncio.sleep(1.1)
        await stub.SwapOn(request, metadata=auth("alice"))  # refilled


async def test_audit_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="netswap.audit")
    async with running_server(tmp_path) as srv, stub_for(srv.address) as stub:
        a = await stub.SwapOn(swap_pb2.SwapOnRequest(name="vm1", size_bytes=PS), metadata=auth("alice"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SwapOn(swap_pb2.SwapOnRequest(name="vm1", size_bytes=2 * PS), metadata=auth("alice"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ListAreas(
                swap_pb2.ListAreasRequest(), metadata=(("authorization", "Bearer stolen-guess"),)
            )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SwapIn(swap_pb2.SwapInRequest(handle=a.handle, slots=[0]), metadata=auth("bob"))
        await stub.SwapOff(swap_pb2.SwapOffRequest(handle=a.handle), metadata=auth("alice"))
    lines = [r.getMessage() for r in caplog.records if r.name == "netswap.audit"]
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["swapon", "swapon", "authn_failure", "authz_failure", "swapoff"]
    ok, refused, authn, authz, off = events
    assert (
        ok["principal"] == "alice" and ok["area"] == "vm1" and ok["outcome"] == "ok" and ok["created"] is True
    )
    assert ok["peer"].startswith("ipv4:127.0.0.1:")
    assert refused["outcome"].startswith("SizeMismatch:")
    assert authn["outcome"] == "unknown_token" and authn["method"] == "ListAreas" and authn["peer"]
    assert authz["principal"] == "bob" and authz["owner"] == "alice" and authz["method"] == "SwapIn"
    assert off == {**off, "event": "swapoff", "principal": "alice", "area": "vm1", "outcome": "ok"}
    text = "\n".join(lines)
    assert "stolen-guess" not in text and all(token not in text for token in TOKENS.values())


def test_tokens_file_must_be_ours_plain_and_utf8(tmp_path: Path) -> None:
    real = write_tokens(tmp_path / "real.toml")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    with pytest.raises(TokensError, match="cannot read tokens file"):
        TokenTable.load(link)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[principals.a]")
    binary.chmod(0o600)
    with pytest.raises(TokensError, match="not UTF-8"):
        TokenTable.load(binary)
    os.chown(real, 12345, -1)
    with pytest.raises(TokensError, match="owned by uid 12345"):
        TokenTable.load(real)


def test_secrets_written_into_existing_files_are_private(tmp_path: Path) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    out = tmp_path / "dev.token"
    out.write_text("old")
    out.chmod(0o644)
    argv = [sys.executable, "-m", "netswap.server", "gen-token", "dev", "--tokens", str(tmp_path / "t.toml")]
    subprocess.run([*argv, "--token-out", str(out)], check=True, capture_output=True)
    assert oct(out.stat().st_mode & 0o777) == "0o600" and out.read_text().strip() != "old"


async def test_absurd_names_are_named_briefly(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, stub_for(srv.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SwapOn(
                swap_pb2.SwapOnRequest(name="x/" * 250_000, size_bytes=PS), metadata=auth("alice")
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(500000 characters)" in (err.value.details() or "") and len(err.value.details() or "") < 300
