"""The `netswap` command, run as a user would."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import netswap, server_process

SERVER = [sys.executable, "-m", "netswap.server"]


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
