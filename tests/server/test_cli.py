"""`netswap-server` and its subcommands, run as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from netswap.server.auth import TokenTable
from tests.helpers import TOKENS, netswap, server_process

SERVER = [sys.executable, "-m", "netswap.server"]


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
