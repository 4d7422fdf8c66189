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
# machine the frontend may not lower its own to -1000). 1 MiB per 10 ms: slow
# enough that the group refills what a kill freed in ~100 ms -- long after
# hogs_at_the_limit has replaced the victim -- fast enough to hit the limit
# dozens of times in a run. (At 1 MiB/ms the OOM killer took three hogs in
# 170 ms, and then the frontend: its only candidate left.)
HOG = """
import time
chunks = []
while True:
    chunk = bytearray(1 << 20)
    for i in range(0, len(chunk), 4096):
        chunk[i] = 1
    chunks.append(chunk)
    time.sleep(0.01)
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


def fence(cgroup: MemoryCgroup, nbd: Frontend) -> int:
    """Limit `cgroup` to what the warmed-up frontend has charged plus a margin; return the limit.

    The margin is what keeps the OOM killer off the frontend in this sandbox,
    where it may not lower its own oom_score_adj (production: -1000, immune).
    The killer ranks a task by its RSS plus oom_score_adj/1000 of the group's
    limit, so a hog at +1000 -- even one just born, with almost no RSS --
    outranks the frontend (score: its RSS, shared libraries included, which
    exceeds what is charged to this group) only while the limit is above the
    frontend's RSS. At least 48 MiB, so the hogs have room to grow and die.
    """
    limit = max(cgroup.usage + 48 * MiB, nbd.status("VmRSS") + 32 * MiB)
    cgroup.set_limit(limit)
    return limit


def explain_death(nbd: Frontend) -> str:
    """Why the frontend is gone, for an assertion message."""
    if nbd.alive():
        return "the frontend is alive"
    code = nbd.proc.returncode if nbd.proc is not None else None
    why = " (SIGKILL: the OOM killer?)" if code == -signal.SIGKILL else ""
    return f"the frontend died with status {code}{why}; its log:\n{nbd.log.read_text()[-2000:]}"


HOGS = 3  # alive at once


@contextlib.asynccontextmanager
async def hogs_at_the_limit(cgroup: MemoryCgroup) -> AsyncIterator[None]:
    """Keep HOGS processes allocating in `cgroup` until the block ends, then kill what is left.

    Several, replaced within milliseconds: the OOM killer must always find a
    hog to take. Were every hog dead or dying at once, the next charge in the
    group (the frontend's own I/O takes a few kernel pages -- socket buffers)
    would find only the frontend to kill. In production oom_score_adj -1000
    makes it unkillable; this sandbox does not permit that.
    """
    hogs: list[subprocess.Popen[bytes]] = []

    async def keep() -> None:
        nonlocal hogs
        while True:
            hogs = [h for h in hogs if h.poll() is None]  # poll() also reaps the dead
            while len(hogs) < HOGS:
                hogs.append(subprocess.Popen(cgroup.wrap([sys.executable, "-c", HOG], oom_score_adj=1000)))
            await asyncio.sleep(0.01)

    keeper = asyncio.ensure_future(keep())
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        for hog in hogs:
            if hog.poll() is None:
                hog.kill()
            hog.wait()
