"""TLS and mutual TLS: who gets in, who does not, and what a certificate lets you touch."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from netswap.client import AreaNotFound, AuthenticationFailed, ConnectionLost, SwapClient, TlsFiles
from netswap.server.config import Config
from netswap.server.devcerts import Issued, issue, make_ca
from tests.helpers import PS, TOKENS, Running, auth, running_server


@dataclass
class Pki:
    dir: Path
    ca: Issued

    def write(self, name: str, issued: Issued) -> TlsFiles:
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        return TlsFiles(ca=self.dir / "ca.pem", cert=cert, key=key)

    def client(self, name: str, principal: str | None = None, **kw: object) -> TlsFiles:
        return self.write(name, issue(self.ca, name, principal=principal, **kw))  # type: ignore[arg-type]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    ca = make_ca()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    pki = Pki(d, ca)
    pki.write("server", issue(ca, "netswap server", server=True))
    return pki


@pytest.fixture
async def mtls(tmp_path: Path, pki: Pki) -> AsyncIterator[Running]:
    async with running_server(
        tmp_path,
        "file",
        tls_cert=pki.dir / "server.pem",
        tls_key=pki.dir / "server.key",
        tls_client_ca=pki.dir / "ca.pem",
    ) as srv:
        yield srv


async def test_a_valid_client_certificate_is_the_principal(mtls: Running, pki: Pki) -> None:
    alice = pki.client("alice", principal="alice")
    async with await SwapClient.connect(mtls.address, None, tls=alice) as client:
        area = await client.swapon("vm1", 1 << 20)
        await area.swap_out([0], bytes([1]) * PS)
        assert [a.name for a in await client.list_areas()] == ["vm1"]
        area.detach()
    assert [a.name for a in mtls.server.manager.list_areas("alice")] == ["vm1"]


@pytest.mark.parametrize("case", ["no client certificate", "another CA", "expired", "plaintext"])
async def test_connections_that_must_not_get_in(mtls: Running, pki: Pki, tmp_path: Path, case: str) -> None:
    if case == "no client certificate":
        tls: TlsFiles | None = TlsFiles(ca=pki.dir / "ca.pem")
    elif case == "another CA":
        other = Pki(tmp_path / "other", make_ca("someone else's CA"))
        other.dir.mkdir()
        forged = other.client("alice", principal="alice")
        tls = TlsFiles(ca=pki.dir / "ca.pem", cert=forged.cert, key=forged.key)
    elif case == "expired":
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
        tls = pki.client("old-alice", principal="alice", valid_from=start, valid_days=1)
    else:
        tls = None  # plaintext to a TLS port
    async with await SwapClient.connect(mtls.address, TOKENS["alice"], tls=tls, timeout=10) as client:
        with pytest.raises(ConnectionLost) as err:
            await client.list_areas()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert mtls.server.manager.area_count() == 0


async def test_a_certificate_without_a_principal_is_unauthenticated(mtls: Running, pki: Pki) -> None:
    nobody = pki.client("nobody", principal=None)
    async with await SwapClient.connect(mtls.address, TOKENS["alice"], tls=nobody) as client:
        with pytest.raises(AuthenticationFailed, match="names no principal"):
            await client.list_areas()
    assert mtls.metric("netswap_auth_failures_total", {"reason": "certificate_without_principal"}) == 1


async def test_bobs_certificate_cannot_touch_alices_areas(mtls: Running, pki: Pki) -> None:
    alice, bob = pki.client("alice", principal="alice"), pki.client("bob", principal="bob")
    async with await SwapClient.connect(mtls.address, None, tls=alice) as a_client:
        area = await a_client.swapon("secret", 1 << 20)
        await area.swap_out([0], bytes([7]) * PS)
    async with await SwapClient.connect(mtls.address, None, tls=bob) as b_client:
        assert await b_client.list_areas() == []
        # replaying alice's handle over bob's connection
        area._client = b_client
        with pytest.raises(AreaNotFound):
            await area.swap_in([0])
        with pytest.raises(AreaNotFound):
            await area.swapoff()
        # a token for alice does not make bob's certificate alice's
        b_client._metadata = auth("alice")
        with pytest.raises(AuthenticationFailed, match="different principals"):
            await b_client.list_areas()
    assert [a.pages_stored for a in mtls.server.manager.list_areas("alice")] == [1]


async def test_require_token_wants_both_and_the_same_principal(tmp_path: Path, pki: Pki) -> None:
    alice = pki.client("alice", principal="alice")
    async with running_server(
        tmp_path, tls_cert=pki.dir / "server.pem", tls_key=pki.dir / "server.key",
        tls_client_ca=pki.dir / "ca.pem", require_token=True,
    ) as srv:  # fmt: skip
        async with await SwapClient.connect(srv.address, TOKENS["alice"], tls=alice) as ok:
            assert await ok.list_areas() == []
        async with await SwapClient.connect(srv.address, None, tls=alice) as no_token:
            with pytest.raises(AuthenticationFailed, match="missing bearer token"):
                await no_token.list_areas()
        async with await SwapClient.connect(srv.address, TOKENS["bob"], tls=alice) as mixed:
            with pytest.raises(AuthenticationFailed, match="different principals"):
                await mixed.list_areas()


async def test_server_only_tls_still_wants_a_token(tmp_path: Path, pki: Pki) -> None:
    async with running_server(
        tmp_path, tls_cert=pki.dir / "server.pem", tls_key=pki.dir / "server.key"
    ) as srv:
        server_ca = TlsFiles(ca=pki.dir / "ca.pem")
        async with await SwapClient.connect(srv.address, TOKENS["bob"], tls=server_ca) as client:
            assert await client.list_areas() == []
        async with await SwapClient.connect(srv.address, None, tls=server_ca) as anonymous:
            with pytest.raises(AuthenticationFailed, match="missing bearer token"):
                await anonymous.list_areas()


def test_plaintext_is_only_for_loopback_unless_insecure(tmp_path: Path) -> None:
    tokens = tmp_path / "t.toml"
    for listen in ("127.0.0.1:0", "localhost:50051", "[::1]:50051", "unix:/tmp/x.sock"):
        Config(listen=listen, tokens=tokens)
    for listen in ("0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051", "example.com:50051"):
        with pytest.raises(ValueError, match="refusing plaintext"):
            Config(listen=listen, tokens=tokens)
        assert Config(listen=listen, tokens=tokens, insecure=True).insecure
    with pytest.raises(ValueError, match="go together"):
        Config(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="needs --tls-cert"):
        Config(tls_client_ca=tmp_path / "ca.pem")


def test_insecure_is_announced_loudly(tmp_path: Path) -> None:
    from tests.helpers import write_tokens  # noqa: PLC0415

    argv = [sys.executable, "-m", "netswap.server", "--listen", "0.0.0.0:0", "--insecure"]
    argv += ["--tokens", str(write_tokens(tmp_path / "t.toml")), "--metrics-listen", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "serving on" in line:
                break
        assert sum("INSECURE: plaintext on 0.0.0.0:0" in s for s in seen) == 3, seen
        assert "PLAINTEXT + token" in seen[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_cli_over_mutual_tls_needs_no_token(tmp_path: Path, pki: Pki) -> None:
    from tests.helpers import ServerProcess  # noqa: PLC0415

    alice = pki.client("alice", principal="alice")
    server = ServerProcess(tmp_path, tmp_path / "store")
    server.argv[server.argv.index("--listen") + 1] = "127.0.0.1:0"
    server.argv += ["--tls-cert", str(pki.dir / "server.pem"), "--tls-key", str(pki.dir / "server.key")]
    server.argv += ["--tls-client-ca", str(pki.dir / "ca.pem")]
    server.start()
    try:
        address = server.log.read_text().split("serving on ")[1].split(" ")[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NETSWAP_")}
        argv = [sys.executable, "-m", "netswap.client", "--server", address, "--tls-ca", str(alice.ca)]
        argv += [
            "--tls-cert",
            str(alice.cert),
            "--tls-key",
            str(alice.key),
            "swapon",
            "vm1",
            "--size",
            "1MiB",
        ]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "created vm1" in out.stdout
        assert "mutual TLS" in server.log.read_text()
    finally:
        server.stop_quietly()


def test_gen_dev_certs(tmp_path: Path) -> None:
    from cryptography import x509  # noqa: PLC0415

    out = subprocess.run(
        [sys.executable, "-m", "netswap.server", "gen-dev-certs", str(tmp_path / "c"), "--principal", "a.b", "--principal", "z"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == sorted(
        [
            "ca.pem",
            "server.pem",
            "server.key",
            "client-a.b.pem",
            "client-a.b.key",
            "client-z.pem",
            "client-z.key",
        ]
    )
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (tmp_path / "c").glob("*.key"))
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "client-a.b.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://netswap.dev/principal/a.b"]
    bad = subprocess.run(
        [sys.executable, "-m", "netswap.server", "gen-dev-certs", str(tmp_path / "d"), "--principal", "../x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "principal name '../x' must be" in bad.stderr


async def test_a_certificate_for_an_unlisted_principal_is_refused_and_removal_revokes(
    mtls: Running, pki: Pki, tmp_path: Path
) -> None:
    mallory = pki.client("mallory", principal="mallory")  # signed by the right CA, not in the tokens file
    async with await SwapClient.connect(mtls.address, None, tls=mallory) as client:
        with pytest.raises(AuthenticationFailed, match="'mallory' of the client certificate is not known"):
            await client.swapon("vm1", PS)
    alice = pki.client("alice", principal="alice")
    async with await SwapClient.connect(mtls.address, None, tls=alice) as client:
        assert await client.list_areas() == []
        tokens = tmp_path / "tokens.toml"
        text = tokens.read_text()
        tokens.write_text(text[text.index("[principals.bob]") :])  # alice removed
        mtls.server.credentials.reload()  # what SIGHUP does
        with pytest.raises(AuthenticationFailed, match="not known"):
            await client.list_areas()
    assert mtls.metric("netswap_auth_failures_total", {"reason": "unknown_principal"}) == 2
