"""A reader of the server's log that stops reading must not stall any tenant."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from netswap.common.logsink import LIMIT
from netswap.v1 import swap_pb2, swap_pb2_grpc
from tests.helpers import auth, free_port, write_tokens

F_SETPIPE_SZ = 1031
PAIRS = LIMIT // 2 + 500  # SwapOn + SwapOff, an audit line each: more than the writer's queue holds


def read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"{marker!r} not in the log:\n{seen.decode()[-2000:]}"
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"the log ended before {marker!r}:\n{seen.decode()[-2000:]}"
            seen += chunk


def test_a_log_nobody_reads_stalls_no_request_and_drops_are_counted(tmp_path: Path) -> None:
    sock, port = tmp_path / "grpc.sock", free_port()
    argv = [
        sys.executable, "-m", "netswap.server", "--listen", f"unix:{sock}", "--store", "memory",
        "--capacity", "64MiB", "--tokens", str(write_tokens(tmp_path / "tokens.toml")),
        "--metrics-listen", f"127.0.0.1:{port}", "--swapon-rate", "100000", "--swapon-burst", "100000",
    ]  # fmt: skip
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # the smallest pipe: full after a few lines
    proc = subprocess.Popen(argv, stdout=w, stderr=w)
    os.close(w)
    log = bytearray()
    try:
        read_until(r, b"serving on", log)
        # From here on nobody reads the log: its pipe fills, then the writer's queue.
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = swap_pb2_grpc.SwapServiceStub(channel)
            for i in range(PAIRS):
                on = stub.SwapOn(
                    swap_pb2.SwapOnRequest(name=f"a{i}", size_bytes=1 << 20),
                    metadata=auth("alice"),
                    timeout=10,
                )
                stub.SwapOff(swap_pb2.SwapOffRequest(handle=on.handle), metadata=auth("alice"), timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            metrics = page.read().decode()
        dropped = int(float(re.search(r"^netswap_log_lines_dropped_total (\S+)$", metrics, re.M)[1]))  # type: ignore[index]
        assert dropped > 0
        # The reader is back: what was queued comes out, then how many lines were dropped --
        # before the server is stopped, so its last lines find room.
        read_until(r, b"log lines dropped", log)
        proc.terminate()
        while chunk := os.read(r, 1 << 16):  # to the end: the server has exited
            log += chunk
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)
    text = log.decode()
    reported = sum(int(n) for n in re.findall(r"netswap: (\d+) log lines dropped", text))
    assert reported == dropped
    audited = len(re.findall(r'"event": "swap(?:on|off)"', text))
    assert audited + dropped == 2 * PAIRS  # every audit line written or counted as dropped
