"""What the benchmark scripts share: a tokens file, and the processes they start and stop."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

TOKEN = "bench-token"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_runtimes(pid: int) -> dict[str, int]:
    """Nanoseconds on a CPU so far of each live thread of process `pid` (schedstat: finer
    than cpu_seconds' clock ticks, for measurements of a few milliseconds)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            out[task.name] = int((task / "schedstat").read_text().split()[0])
    return out


def runtime_between(before: dict[str, int], after: dict[str, int]) -> float:
    """Seconds of CPU between two thread_runtimes() (a thread that ended meanwhile is not counted)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


def voluntary_switches(pid: int) -> int:
    """Times the threads of process `pid` have gone to sleep so far (voluntary context switches)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            status = (task / "status").read_text()
            total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def write_tokens(directory: Path) -> Path:
    """A tokens file with one principal, `bench`, whose token is TOKEN."""
    tokens = directory / "tokens.toml"
    tokens.write_text(f'[principals.bench]\ntoken_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\n')
    tokens.chmod(0o600)  # the server refuses a tokens file others can read
    return tokens


@contextlib.contextmanager
def started(
    argv: list[str], log: Path, sock: Path, env: dict[str, str] | None = None, marker: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """argv running until the block ends; ready once `sock` exists (and `marker` is in its log)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() or (marker is not None and marker not in log.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def server_argv(tmp: Path, sock: Path, *extra: str) -> list[str]:
    """netswap-server on unix socket `sock`, file store under `tmp`, no metrics port."""
    argv = [
        sys.executable,
        "-m",
        "netswap.server",
        "--listen",
        f"unix:{sock}",
        "--store",
        f"file:{tmp}/store",
    ]
    return [*argv, "--tokens", str(write_tokens(tmp)), "--metrics-listen", "", *extra]


@contextlib.contextmanager
def netswap_nbd(
    tmp: Path, size: str, capacity: str, realtime: bool = True, name: str = "bench"
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str]]:
    """A file-store server and `netswap nbd` on it, as deployed unless `realtime` is False
    (--no-realtime): (server, frontend, NBD URI)."""
    grpc_sock, nbd_sock = tmp / "grpc.sock", tmp / "nbd.sock"
    env = {**os.environ, "NETSWAP_TOKEN": TOKEN, "NETSWAP_SERVER": f"unix:{grpc_sock}"}
    nbd_argv = [
        sys.executable,
        "-m",
        "netswap.client",
        "nbd",
        name,
        "--size",
        size,
        "--socket",
        str(nbd_sock),
        *([] if realtime else ["--no-realtime"]),
    ]
    with (
        started(server_argv(tmp, grpc_sock, "--capacity", capacity), tmp / "server.log", grpc_sock) as server,
        started(nbd_argv, tmp / "nbd.log", nbd_sock, env, "netswap nbd: serving") as nbd,
    ):
        yield server, nbd, f"nbd+unix:///?socket={nbd_sock}"
