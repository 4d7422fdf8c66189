"""`netswap nbd` as its own process -- optionally inside a memory cgroup -- for reserve-safety tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from netswap.client.reserve import status_bytes
from tests.helpers import TOKENS

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")

MiB = 1 << 20

# Allocates and touches memory until something stops it. It runs with
# oom_score_adj 1000 from its first allocation: should an OOM killer be
# involved, it is the one to go (raising a score needs no privilege; on this
# machine the frontend may not lower its own to -1000).
HOG = """
import time
chunks = []
while True:
    chunk = bytearray(1 << 20)
    for i in range(0, len(chunk), 4096):
        chunk[i] = 1
    chunks.append(chunk)
    time.sleep(0.001)
"""


class MemoryCgroup:
    """A cgroup v1 memory controller group of our own (this machine has v1; CI runs as root)."""

    def __init__(self) -> None:
        if os.geteuid() != 0 or not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
            raise RuntimeError(f"needs root and the cgroup v1 memory controller at {CGROUP_V1_MEMORY}")
        self.path = CGROUP_V1_MEMORY / f"netswap-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    def wrap(self, argv: list[str], oom_score_adj: int | None = None) -> list[str]:
        """argv, started inside this group (so everything it allocates is charged here).

        oom_score_adj is set before argv starts, so it applies from its first allocation.
        """
        # The score first: from the moment it is in the group, any allocation
        # may wake the OOM killer, and it must already see the right score.
        adj = f"echo {oom_score_adj} > /proc/self/oom_score_adj && " if oom_score_adj is not None else ""
        return ["sh", "-c", f'{adj}echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def set_limit(self, nbytes: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(nbytes))

    @property
    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes"))

    @property
    def failcnt(self) -> int:
        return int(self._read("memory.failcnt"))

    @property
    def oom_kills(self) -> int:
        match = re.search(r"^oom_kill (\d+)", self._read("memory.oom_control"), re.MULTILINE)
        return int(match.group(1)) if match else 0

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:  # still has (dying) members
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class Frontend:
    """`netswap nbd NAME` as a user runs it (re-exec, mlockall and all)."""

    def __init__(self, tmp_path: Path, server: str, name: str, size: str, *extra: str) -> None:
        self.socket = tmp_path / f"{name}.sock"
        self.log = tmp_path / f"nbd-{name}.log"
        self.argv = [sys.executable, "-m", "netswap.client", "nbd", name, "--size", size]
        self.argv += ["--socket", str(self.socket), "--metrics-listen", "127.0.0.1:0", *extra]
        self.env = {**os.environ, "NETSWAP_TOKEN": TOKENS["alice"], "NETSWAP_SERVER": server}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, cgroup: MemoryCgroup | None = None) -> None:
        argv = cgroup.wrap(self.argv) if cgroup else self.argv
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "netswap nbd: serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"netswap nbd did not start:\n{self.log.read_text()}")
            await asyncio.sleep(0.05)

    def status(self, field: str) -> int:
        return status_bytes(field, self.pid)

    def metric(self, name: str) -> float:
        url = re.findall(r"metrics at (http://\S+)", self.log.read_text())[-1]
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not exported"
        return float(match.group(1))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
            await asyncio.sleep(0.05)
        return self.proc.returncode


@contextlib.asynccontextmanager
async def hogs_at_the_limit(cgroup: MemoryCgroup) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """Keep two HOG processes alive in `cgroup` until the block ends, then kill what is left.

    Two, so that while the OOM killer's last victim is still dying the next
    candidate is a hog, not whatever else lives in the group. (The frontend's
    own I/O takes a few kernel pages -- socket buffers -- charged to the group,
    so at the limit it does wake the OOM killer; in production oom_score_adj
    -1000 makes it unkillable, which this sandbox does not permit.)
    """
    hogs: list[subprocess.Popen[bytes]] = []

    async def keep() -> None:
        while True:
            while sum(h.poll() is None for h in hogs) < 2:
                hogs.append(subprocess.Popen(cgroup.wrap([sys.executable, "-c", HOG], oom_score_adj=1000)))
            await asyncio.sleep(0.05)

    keeper = asyncio.ensure_future(keep())
    try:
        yield hogs
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        for hog in hogs:
            if hog.poll() is None:
                hog.kill()
            hog.wait()
