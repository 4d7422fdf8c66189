"""Several servers as one pool: placement, DNS SRV discovery, and the CLI with --replicas."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netswap.client.fleet import Fleet
from netswap.client.mirror import MirroredArea, State
from netswap.client.placement import parse_servers, ranked
from netswap.client.srv import SrvError, parse, query, resolve
from tests.helpers import TOKENS, ServerProcess, free_port, netswap, pattern, running_server


def test_placement_is_deterministic_and_moves_little_when_the_set_changes() -> None:
    servers = [f"10.0.0.{i}:50051" for i in range(5)]
    order = ranked("alice", "vm1", servers)
    assert sorted(order) == sorted(servers)
    assert ranked("alice", "vm1", list(reversed(servers))) == order  # the order given does not matter
    assert ranked("bob", "vm1", servers) != order or ranked("alice", "vm2", servers) != order
    # Removing a server that holds no copy of an area leaves its copies where they are.
    spare = order[-1]
    assert ranked("alice", "vm1", [s for s in servers if s != spare])[:2] == order[:2]
    moved = sum(
        ranked("p", f"a{i}", servers)[:2] != ranked("p", f"a{i}", [*servers, "10.0.0.9:50051"])[:2]
        for i in range(200)
    )
    assert moved < 200 * 0.6  # a new server takes a share, not everything


def test_server_lists_are_parsed() -> None:
    assert parse_servers("a:1") == ["a:1"]
    assert parse_servers(" a:1, b:2 ,c:3") == ["a:1", "b:2", "c:3"]
    assert (
        parse_servers("dns-srv:_grpc._tcp.netswap.ns.svc.cluster.local")
        == "_grpc._tcp.netswap.ns.svc.cluster.local"
    )
    for bad in ("", ",", "dns-srv:", "a:1,a:1"):
        with pytest.raises(ValueError):
            parse_servers(bad)


@contextlib.contextmanager
def dnsmasq(tmp_path: Path, records: list[str]) -> Iterator[str]:
    """A real nameserver on loopback answering `records` (dnsmasq --srv-host values)."""
    binary = shutil.which("dnsmasq")
    if binary is None:
        raise RuntimeError("dnsmasq not found: `make test` installs it (dnsmasq-base)")
    port = free_port()
    argv = [binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces"]
    argv += [
        "--listen-address=127.0.0.1",
        f"--port={port}",
        "--user=root",
        f"--pid-file={tmp_path / 'dns.pid'}",
    ]
    argv += [f"--srv-host={r}" for r in records]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


async def test_dns_srv_names_the_servers(tmp_path: Path) -> None:
    name = "_grpc._tcp.netswap.test"
    with dnsmasq(tmp_path, [f"{name},localhost,{p},0,1" for p in (50061, 50062, 50063)]) as dns:
        targets = await resolve(name, dns)
        assert sorted(t.address for t in targets) == ["localhost:50061", "localhost:50062", "localhost:50063"]
        with pytest.raises(SrvError, match=r"NXDOMAIN|REFUSED|no SRV"):
            await resolve("_grpc._tcp.nothing.test", dns)


def three(tmp_path: Path) -> list[ServerProcess]:
    servers = []
    for i in range(3):
        home = tmp_path / f"server{i}"
        home.mkdir()
        server = ServerProcess(home, home / "store")
        server.start()
        servers.append(server)
    return servers


async def test_a_mirrored_area_on_servers_found_by_srv(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for i in range(3):
            home = tmp_path / f"server{i}"
            home.mkdir()
            servers.append(await stack.enter_async_context(running_server(home, "memory")))
        ports = [int(s.address.rpartition(":")[2]) for s in servers]
        name = "_grpc._tcp.netswap.test"
        with dnsmasq(tmp_path, [f"{name},127.0.0.1,{port},0,1" for port in ports]) as dns:
            fleet = await Fleet.connect(f"dns-srv:{name}", TOKENS["alice"], dns_server=dns)
        async with fleet:
            assert sorted(fleet.servers) == sorted(f"127.0.0.1:{p}" for p in ports)
            area = await fleet.swapon("vm1", 1 << 20, replicas=2)
            assert isinstance(area, MirroredArea)
            assert [r.state for r in area.replicas] == [State.UP, State.UP]
            await area.swap_out(range(0, 64), pattern(1, 64))
            with await area.swap_in(range(0, 64)) as pages:
                assert bytes(pages.view) == pattern(1, 64)
            areas, unreachable = await fleet.areas()
            assert not unreachable
            (info,) = areas
            assert sorted(c.server for c in info.copies) == sorted(r.server for r in area.replicas)
            assert [c.pages_stored for c in info.copies] == [65, 65]  # and the generation page
            area.detach()
            # Attached again: the same two servers (placement, and the copies already there).
            again = await fleet.swapon("vm1", 1 << 20, replicas=2)
            assert isinstance(again, MirroredArea) and not again.created
            assert [r.server for r in again.replicas] == [r.server for r in area.replicas]
            with await again.swap_in(range(0, 64)) as pages:
                assert bytes(pages.view) == pattern(1, 64)
            await again.swapoff()
            assert (await fleet.areas())[0] == []


def test_the_cli_with_three_servers_and_two_replicas(tmp_path: Path) -> None:
    servers = three(tmp_path)
    try:
        address = ",".join(s.address for s in servers)
        made = netswap(address, "--replicas", "2", "swapon", "vm1", "--size", "4MiB")
        assert made.returncode == 0, made.stderr
        assert "created vm1: 4MiB (1024 pages)" in made.stdout and made.stdout.count("replica on ") == 2
        demo = netswap(address, "--replicas", "2", "demo", "--size", "2MiB", "--name", "d", "--keep")
        # 2 MiB areas, the last page of each the mirror's generation: 511 pages of data
        assert demo.returncode == 0 and "verified: all 511 pages" in demo.stdout, demo.stderr
        listed = netswap(address, "ls")
        rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
        assert listed.stdout.splitlines()[0].split() == ["NAME", "SIZE", "PAGES", "STORED", "REPLICAS"]
        # each copy also stores the generation page
        assert rows["d"].count("=stored(512)") == 2 and rows["vm1"].count("=stored(1)") == 2
        servers[0].kill9()  # ls says who it could not ask
        listed = netswap(address, "ls")
        assert listed.returncode == 0 and f"unreachable: {servers[0].address}" in listed.stdout
        servers[0].start()
        gone = netswap(address, "swapoff", "d")
        assert gone.returncode == 0 and gone.stdout.startswith("destroyed d on ")
        assert "d " not in netswap(address, "ls").stdout
        one = netswap(servers[1].address, "ls")  # a single server: as ever, no REPLICAS column
        assert one.stdout.splitlines()[0].split() == ["NAME", "SIZE", "PAGES", "STORED"]
    finally:
        for server in servers:
            server.stop_quietly()


@given(st.binary(max_size=600))
def test_any_answer_is_parsed_or_refused_as_malformed(junk: bytes) -> None:
    # Whatever comes back over UDP: targets, or SrvError -- never another exception.
    ident = int.from_bytes(junk[:2].ljust(2, b"\0"), "big")
    with contextlib.suppress(SrvError):
        for target in parse(junk, ident):
            assert 0 < len(target.host) <= 255


def test_a_real_answer_with_compression_is_parsed() -> None:
    question = query("_grpc._tcp.netswap.test", 7)[12:-11]  # the question's name and its type/class
    answer = bytearray(struct.pack(">HHHHHH", 7, 0x8180, 1, 1, 0, 0)) + question
    target = bytes([4]) + b"node" + b"\xc0\x0c"  # node.<the question's name>
    rdata = struct.pack(">HHH", 1, 2, 50051) + target
    answer += b"\xc0\x0c" + struct.pack(">HHIH", 33, 1, 60, len(rdata)) + rdata
    (found,) = parse(bytes(answer), 7)
    assert (found.priority, found.weight, found.address) == (1, 2, "node._grpc._tcp.netswap.test:50051")
    looped = bytearray(answer)
    looped[-2:] = b"\xc0" + bytes([len(answer) - 2])  # a pointer to itself
    with pytest.raises(SrvError, match="pointer forwards"):
        parse(bytes(looped), 7)
