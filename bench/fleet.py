"""A mirrored area against a single one, and what losing a copy costs.

    .venv/bin/python bench/fleet.py [--runs 2] [--seconds 4] [--no-guest] [--json out.json]

Three `netswap-server`s (file stores, unix sockets) and `netswap nbd` as
deployed (a subprocess, locked), once with --server naming one of them
(single) and once naming all three with --replicas 2 (mirrored), alternating:

1. fio through NBD, the workloads of bench/block.py: IOPS mirrored over single.
2. The QEMU guest swap test, wall time mirrored over single.
3. Failover pause: 4 KiB writes at queue depth one (nbd's own client, from
   this process) while one replica's server is SIGSTOPped: the longest write.
4. Resync: 256 MiB written, one replica's machine lost (kill -9, store
   deleted) and started again empty; the time until the frontend reports
   its area whole again, and the rate that makes.

Goals: guest wall mirrored <= 1.15x single; pause <= failover timeout + 0.5 s;
resync >= 200 MiB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from block import WORKLOADS, fio
from procs import TOKEN, server_argv, started

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.guestvm import guest_assets, run_guest  # noqa: E402  (the same guest the tests boot)

FAILOVER = 1.0
GOALS = {"guest": 1.15, "pause": FAILOVER + 0.5, "resync": 200.0}


@contextlib.contextmanager
def servers(tmp: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path, Path]]]:
    """Three servers: (process, socket, store)."""
    with contextlib.ExitStack() as stack:
        out = []
        for i in range(3):
            home = tmp / f"server{i}"
            home.mkdir()
            sock = home / "grpc.sock"
            argv = server_argv(home, sock, "--capacity", "2GiB")
            out.append((stack.enter_context(started(argv, home / "server.log", sock)), sock, home / "store"))
        yield out


@contextlib.contextmanager
def frontend(tmp: Path, socks: list[Path], replicas: int, name: str) -> Iterator[tuple[str, int, Path]]:
    """`netswap nbd` on `socks`: (NBD URI, its pid, its log)."""
    nbd_sock = tmp / f"{name}.sock"
    port = _free_port()
    env = {**os.environ, "NETSWAP_TOKEN": TOKEN, "NETSWAP_SERVER": ",".join(f"unix:{s}" for s in socks)}
    argv = [sys.executable, "-m", "netswap.client", "--replicas", str(replicas)]
    # 513 MiB areas: a mirror is a page less (its generation page), and fio uses 512 MiB of either
    argv += ["--failover-timeout", str(FAILOVER), "nbd", name, "--size", "513MiB", "--socket", str(nbd_sock)]
    argv += ["--metrics-listen", f"127.0.0.1:{port}"]
    log = tmp / f"{name}.log"
    with started(argv, log, nbd_sock, env, "netswap nbd: serving") as proc:
        yield f"nbd+unix:///?socket={nbd_sock}", port, log
        del proc
    # Its copies' reservations back, or the servers' --capacity runs out a few areas later
    # (best effort: a run that lost a server has nothing to give back there).
    swapoff = [sys.executable, "-m", "netswap.client", "swapoff", name]
    subprocess.run(swapoff, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rpartition(" ")[2])
    return total


def fio_table(tmp: Path, socks: list[Path], runs: int, seconds: float) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, list[float]]] = {}
    for run in range(runs):
        for kind, replicas, which in (("single", 1, socks[:1]), ("mirrored", 2, socks)):
            with frontend(tmp, which, replicas, f"{kind}{run}") as (uri, _, _):
                subprocess.run(
                    ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
                     "--iodepth=4", "--size=512M", "--output=/dev/null"], cwd=tmp, check=True,
                )  # fmt: skip
                for name, args, direction in WORKLOADS:
                    job = fio(uri, args, seconds, tmp)[direction]
                    rows.setdefault(name, {}).setdefault(kind, []).append(job["iops"])
    return {
        name: {kind: statistics.median(values) for kind, values in by_kind.items()}
        for name, by_kind in rows.items()
    }


def guest_walls(tmp: Path, socks: list[Path], runs: int) -> dict[str, float]:
    assets = guest_assets(ROOT / "build" / "guest")
    walls: dict[str, list[float]] = {}
    for run in range(runs):
        for kind, replicas, which in (("single", 1, socks[:1]), ("mirrored", 2, socks)):
            with frontend(tmp, which, replicas, f"guest-{kind}{run}") as (uri, _, _):
                result = run_guest(assets, uri)
                if not result.ok:
                    raise RuntimeError(f"guest failed on {kind}: {result.verdict}")
                walls.setdefault(kind, []).append(result.seconds)
    return {kind: statistics.median(v) for kind, v in walls.items()}


async def _writes_at_qd1(sock: Path, stop: asyncio.Event) -> list[float]:
    """4 KiB writes one after another over NBD (fixed newstyle, GO); each one's latency."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    writer.write(
        struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0)
    )  # GO, default export
    while True:
        _, _, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if reply == 1:  # ACK
            break
    latencies = []
    payload = os.urandom(4096)
    n = 0
    while not stop.is_set():
        start = time.perf_counter()
        writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 1, n, (n % 4096) * 4096, 4096) + payload)
        _, error, _ = struct.unpack(">IIQ", await reader.readexactly(16))
        if error:
            raise RuntimeError(f"write failed with NBD error {error}")
        latencies.append(time.perf_counter() - start)
        n += 1
    writer.close()
    return latencies


async def failover_pause(tmp: Path, procs: list[subprocess.Popen[bytes]], socks: list[Path]) -> float:
    with frontend(tmp, socks, 2, "pause") as (uri, _, _):
        sock = Path(uri.partition("socket=")[2])
        stop = asyncio.Event()
        writes = asyncio.ensure_future(_writes_at_qd1(sock, stop))
        await asyncio.sleep(1.0)
        victim = procs[0]  # one of the three holds a replica; any stopped one that does costs the pause
        for proc in procs:  # stop every server in turn: two of them hold the replicas
            os.kill(proc.pid, signal.SIGSTOP)
            await asyncio.sleep(3.0)
            os.kill(proc.pid, signal.SIGCONT)
            await asyncio.sleep(3.0)
        del victim
        stop.set()
        latencies = await writes
    return max(latencies)


def resync_rate(tmp: Path, socks: list[Path], stores: list[Path], procs: list[Any]) -> tuple[float, float]:
    """(seconds to rebuild a lost copy of 256 MiB written, MiB/s)."""
    with frontend(tmp, socks, 2, "resync") as (uri, port, _):
        subprocess.run(
            ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=4",
             "--size=256M", "--output=/dev/null"], cwd=tmp, check=True,
        )  # fmt: skip
        # Lose the machine of a server that holds a copy (placement decides which do), then
        # bring it back empty: that copy is rebuilt.
        data = b"resync".hex() + ".data"
        victim = next(i for i, store in enumerate(stores) if any(store.rglob(data)))
        procs[victim].kill()
        procs[victim].wait()
        shutil.rmtree(stores[victim])
        home = socks[victim].parent
        argv = server_argv(home, socks[victim], "--capacity", "2GiB")
        socks[victim].unlink(missing_ok=True)
        with started(argv, home / "server.log", socks[victim]) as proc:
            procs[victim] = proc
            subprocess.run(  # a write makes the frontend notice the loss, if it held a copy
                ["fio", "--name=poke", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=4k",
                 "--size=4k", "--output=/dev/null"], cwd=tmp, check=True,
            )  # fmt: skip
            start = time.monotonic()
            before = metric(port, "netswap_client_resync_bytes_total")
            while (
                metric(port, "netswap_client_area_degraded")
                or metric(port, "netswap_client_resync_bytes_total") == before
            ):
                if time.monotonic() - start > 120:
                    raise RuntimeError("the copy was not rebuilt within 2 minutes")
                time.sleep(0.05)
            seconds = time.monotonic() - start
            copied = metric(port, "netswap_client_resync_bytes_total") - before
    return seconds, copied / (1 << 20) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-guest", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="netswap-fleet-") as tmp_s:
        tmp = Path(tmp_s)
        with servers(tmp) as running:
            procs = [p for p, _, _ in running]
            socks = [s for _, s, _ in running]
            stores = [st for _, _, st in running]
            result["fio"] = fio_table(tmp, socks, args.runs, args.seconds)
            if not args.no_guest:
                result["guest"] = guest_walls(tmp, socks, args.runs)
            result["pause_s"] = asyncio.run(failover_pause(tmp, procs, socks))
            result["resync_s"], result["resync_mib_s"] = resync_rate(tmp, socks, stores, procs)
    print(f"{'workload':20} {'single IOPS':>12} {'mirrored IOPS':>14} {'ratio':>6}")
    for name, row in result["fio"].items():
        print(
            f"{name:20} {row['single']:12.0f} {row['mirrored']:14.0f} {row['mirrored'] / row['single']:6.2f}"
        )
    lines = []
    if "guest" in result:
        g = result["guest"]
        ratio = g["mirrored"] / g["single"]
        lines.append(("guest wall mirrored / single", f"{g['mirrored']:.1f} s / {g['single']:.1f} s = {ratio:.2f}x",
                      f"<= {GOALS['guest']}x", ratio <= GOALS["guest"]))  # fmt: skip
    lines.append(("longest 4k write while a replica hangs", f"{result['pause_s']:.2f} s",
                  f"<= {GOALS['pause']:.1f} s", result["pause_s"] <= GOALS["pause"]))  # fmt: skip
    lines.append(("rebuild of a lost copy (256 MiB written)", f"{result['resync_s']:.2f} s, {result['resync_mib_s']:.0f} MiB/s",
                  f">= {GOALS['resync']:.0f} MiB/s", result["resync_mib_s"] >= GOALS["resync"]))  # fmt: skip
    print()
    for what, got, goal, met in lines:
        print(f"{what:42} {got:32} {goal:12} {'yes' if met else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
