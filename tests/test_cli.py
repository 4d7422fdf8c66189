"""The two console scripts, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netswap.server.auth import TokenTable
from tests.helpers import TOKENS, server_process

NETSWAP = [sys.executable, "-m", "netswap.client"]
SERVER = [sys.executable, "-m", "netswap.server"]


def netswap(address: str, *args: str, token: str = TOKENS["alice"]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NETSWAP_TOKEN": token, "NETSWAP_SERVER": address}
    return subprocess.run([*NETSWAP, *args], env=env, capture_output=True, text=True, timeout=120)


def test_demo_swapon_ls_swapoff(tmp_path: Path) -> None:
    with server_process(tmp_path, tmp_path / "store") as server:
        demo = netswap(server.address, "demo", "--size", "8MiB", "--seed", "7")
        assert demo.returncode == 0, demo.stderr
        assert "verified: all 2048 pages read back byte-identical" in demo.stdout
        assert "pages/s" in demo.stdout and "MB/s" in demo.stdout

        made = netswap(server.address, "swapon", "vm1", "--size", "4MiB")
        assert made.returncode == 0 and "created vm1: 4MiB (1024 pages)" in made.stdout
        again = netswap(server.address, "swapon", "vm1", "--size", "4MiB")
        assert "exists vm1: 4MiB (1024 pages)" in again.stdout

        kept = netswap(server.address, "demo", "--size", "1MiB", "--name", "kept", "--keep")
        assert kept.returncode == 0, kept.stderr
        listed = netswap(server.address, "ls")
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["NAME", "SIZE", "PAGES", "STORED"]
        assert lines[1].split() == ["kept", "1MiB", "256", "100%"]
        assert lines[2].split() == ["vm1", "4MiB", "0", "0%"]

        wrong = netswap(server.address, "swapon", "vm1", "--size", "8MiB")
        assert wrong.returncode == 1
        assert "exists with size_bytes 4194304" in wrong.stderr and "FAILED_PRECONDITION" in wrong.stderr

        assert netswap(server.address, "swapoff", "vm1").returncode == 0
        missing = netswap(server.address, "swapoff", "vm1")
        assert missing.returncode == 1 and "no area named 'vm1'" in missing.stderr

        denied = netswap(server.address, "ls", token="nope")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        assert server.terminate() == 0


def test_bad_size_flag_is_explained() -> None:
    out = netswap("127.0.0.1:1", "swapon", "x", "--size", "12MB")
    assert out.returncode == 2
    assert "invalid size '12MB'" in out.stderr


def test_server_requires_tokens_and_valid_flags(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETSWAP_")}
    out = subprocess.run([*SERVER], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--tokens (or NETSWAP_TOKENS) is required" in out.stderr
    out = subprocess.run(
        [*SERVER, "--tokens", "t", "--store", "s3:bucket"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--store must be 'memory' or 'file:PATH'" in out.stderr
    out = subprocess.run(
        [*SERVER, "--tokens", str(tmp_path / "missing.toml"), "--metrics-listen", ""],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "cannot read tokens file" in out.stderr


def test_gen_token_appends_a_working_principal(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    for name in ("dev", "ops", "team.a"):
        argv = [*SERVER, "gen-token", name, "--tokens", str(tokens), "--quota", "1GiB"]
        argv += ["--token-out", str(tmp_path / name)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        assert f"principal {name}: token written" in out.stdout
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "dev").stat().st_mode & 0o777) == "0o600"
    table = TokenTable.load(tokens)
    dev = table.authenticate((tmp_path / "dev").read_text().strip())
    assert dev is not None and dev.name == "dev" and dev.quota_bytes == 1 << 30
    ops = table.authenticate((tmp_path / "ops").read_text().strip())
    assert ops is not None and ops.name == "ops"
    dotted = table.authenticate((tmp_path / "team.a").read_text().strip())
    assert dotted is not None and dotted.name == "team.a"
    again = subprocess.run(
        [*SERVER, "gen-token", "ops", "--tokens", str(tokens)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "principal 'ops' is already in" in again.stderr
    bad = subprocess.run(
        [*SERVER, "gen-token", "a/b", "--tokens", str(tokens)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "principal name 'a/b' must be" in bad.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--pool-pages", "8", "--pool-pages must be at least 32"),
        ("--readahead-pages", "-1", "--readahead-pages must be 0-1024"),
        ("--readahead-pages", "4096", "--readahead-pages must be 0-1024"),
    ],
)
def test_nbd_bad_sizes_are_refused_before_connecting(flag: str, value: str, message: str) -> None:
    out = netswap(
        "unix:/nonexistent.sock", "nbd", "vm1", "--size", "1MiB", "--socket", "/tmp/x.sock", flag, value
    )
    assert out.returncode == 1 and message in out.stderr


def test_areas_lists_and_destroys_orphans_of_a_stopped_file_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with server_process(tmp_path, store) as server:
        for who in ("alice", "bob"):
            assert (
                netswap(
                    server.address, "demo", "--size", "1MiB", "--name", "vm", "--keep", token=TOKENS[who]
                ).returncode
                == 0
            )
        busy = subprocess.run(
            [*SERVER, "areas", "list", "--store", f"file:{store}"], capture_output=True, text=True
        )
        assert busy.returncode == 1 and "in use by another process" in busy.stderr
        assert server.terminate() == 0
    tokens = tmp_path / "tokens.toml"
    text = tokens.read_text()
    tokens.write_text(text[text.index("[principals.bob]") :])  # alice is no longer configured
    areas = [*SERVER, "areas"]
    where = ["--store", f"file:{store}", "--tokens", str(tokens)]
    listed = subprocess.run([*areas, "list", *where], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows == [
        ["PRINCIPAL", "AREA", "SIZE", "PAGES", "STORED", "OWNER"],
        ["alice", "vm", "1MiB", "256", "ORPHANED"],
        ["bob", "vm", "1MiB", "256", "configured"],
    ]
    gone = subprocess.run([*areas, "destroy", *where, "--principal", "alice"], capture_output=True, text=True)
    assert gone.returncode == 0 and "destroyed alice/vm: 1MiB, 256 pages stored" in gone.stdout
    missing = subprocess.run(
        [*areas, "destroy", *where, "--principal", "alice"], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "no such area" in missing.stderr
    left = subprocess.run([*areas, "list", *where], capture_output=True, text=True)
    assert [line.split()[0] for line in left.stdout.splitlines()[1:]] == ["bob"]
    memory = subprocess.run([*areas, "list", "--store", "memory"], capture_output=True, text=True)
    assert memory.returncode == 2 and "must be file:DIR" in memory.stderr
