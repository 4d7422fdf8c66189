"""Real servers for tests: in-process on port 0, or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from netswap.server.app import NetswapServer, build_server
from netswap.server.config import Config
from netswap.server.store import open_store
from netswap.v1 import swap_pb2_grpc

PS = 4096
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210"}


def write_tokens(path: Path, quotas: dict[str, int | None] | None = None) -> Path:
    quotas = quotas or {}
    lines = []
    for name, token in TOKENS.items():
        lines.append(f"[principals.{name}]")
        lines.append(f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"')
        if quotas.get(name) is not None:
            lines.append(f"quota_bytes = {quotas[name]}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # the server refuses a tokens file others can read
    return path


def netswap(address: str, *args: str, token: str = TOKENS["alice"]) -> subprocess.CompletedProcess[str]:
    """The `netswap` command, as a user runs it (token and server from the environment)."""
    env = {**os.environ, "NETSWAP_TOKEN": token, "NETSWAP_SERVER": address}
    return subprocess.run(
        [sys.executable, "-m", "netswap.client", *args], env=env, capture_output=True, text=True, timeout=120
    )


def stored_files(root: Path) -> list[Path]:
    """What a file store keeps for areas: everything under its root but its own .state and .lock."""
    return [p for p in root.rglob("*") if not (p.parent == root and p.name in (".state", ".lock"))]


def free_port() -> int:
    """A loopback port free right now, for programs that cannot report the one they bound."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def auth(principal: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[principal]}"),)


@dataclasses.dataclass
class Running:
    server: NetswapServer
    config: Config
    registry: CollectorRegistry
    store_root: Path | None

    @property
    def address(self) -> str:
        return self.server.address

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_server(
    tmp_path: Path,
    store: str = "memory",
    quotas: dict[str, int | None] | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """store: "memory", "file" (under tmp_path) or "file:PATH"."""
    root = tmp_path / "store" if store == "file" else None
    if store.startswith("file:"):
        root = Path(store[5:])
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "store": f"file:{root}" if root else "memory",
        "capacity": 64 << 20,
        "max_area_size": 32 << 20,
        "tokens": write_tokens(tmp_path / "tokens.toml", quotas),
        "metrics_listen": "",
    }
    fields.update(overrides)
    config = Config(**fields)
    registry = CollectorRegistry()
    server = build_server(config, open_store(config.store), registry)
    await server.start()
    try:
        yield Running(server, config, registry, root)
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def stub_for(address: str) -> AsyncIterator[swap_pb2_grpc.SwapServiceAsyncStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield swap_pb2_grpc.SwapServiceStub(channel)


class ServerProcess:
    """`netswap-server` as a subprocess (for kill -9 and signal tests)."""

    def __init__(self, tmp_path: Path, store_root: Path, *extra: str, listen: str = "") -> None:
        # By default a unix socket: the same address after a restart, and no port races.
        self.address = listen or f"unix:{tmp_path / 'grpc.sock'}"
        self.log = tmp_path / "server.log"
        self.argv = [
            sys.executable, "-m", "netswap.server",
            "--listen", self.address,
            "--store", f"file:{store_root}",
            "--capacity", "256MiB",
            "--tokens", str(write_tokens(tmp_path / "tokens.toml")),
            "--metrics-listen", "",
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _spawn(self) -> float:
        self.starts += 1
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        return time.monotonic() + 30

    def _serving(self, deadline: float) -> bool:
        assert self.proc is not None
        if self.log.read_text().count("serving on") >= self.starts:
            return True
        if self.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{self.log.read_text()}")
        return False

    def start(self) -> None:
        deadline = self._spawn()
        while not self._serving(deadline):
            time.sleep(0.05)

    async def astart(self) -> None:
        """start() without blocking the event loop (for tests whose other half runs on it)."""
        deadline = self._spawn()
        while not self._serving(deadline):
            await asyncio.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def server_process(tmp_path: Path, store_root: Path, *extra: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, store_root, *extra)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_quietly()


def pattern(seed: int, pages: int) -> bytes:
    """`pages` pages of distinct, reproducible content."""
    import random  # noqa: PLC0415

    return random.Random(seed).randbytes(pages * PS)
