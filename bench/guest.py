# ruff: noqa: E402  (gRPC may load only after grpcenv.apply())
"""The QEMU guest swap test (tests/guestvm.py) on nbdkit memory and on netswap variants, in one run.

    .venv/bin/python bench/guest.py [--runs 3] [--hog-same 15] [--readahead 0,16,64,256] \\
        [--same-pages both] [--json out.json]

Each run boots the guest once per variant, in turn: nbdkit memory (the
reference), then netswap -- a file-store server and a frontend on unix
sockets, as bench/block.py runs them -- for each read-ahead window in
--readahead and, with --same-pages both, with same-filled pages sent as
words and sent whole. The frontend here is this file run as a process of
its own (`frontend` below: `netswap nbd` without its reserve safety, so
that the client's options can be set); the suite's guest row runs `netswap
nbd` itself. --hog-same makes that percent of the hog's pages same-filled
(7 in 8 of them zeros, see tests/guest/hog.c). Prints the median wall time
of each variant and its ratio to nbdkit's, and the guest's pswpin/pswpout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from netswap.common import grpcenv

grpcenv.apply()

from procs import TOKEN, server_argv, started
from prometheus_client import start_http_server

from netswap.client import SwapClient
from netswap.client.nbd.serve import NBD_MAX_BATCH, NbdOptions, NbdServer
from netswap.client.reserve import ALLOCATOR_ENV
from netswap.common import loop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.guestvm import guest_assets, run_guest

SIZE = 512 << 20


async def frontend(server: str, socket: Path, readahead: int, same_pages: bool) -> None:
    """An NBD frontend on `socket` for area "bench" of `server`."""
    client = await SwapClient.connect(
        server, TOKEN, timeout=10.0, max_batch_pages=NBD_MAX_BATCH, max_rpcs=2, same_pages=same_pages
    )
    area = await client.swapon("bench", SIZE, pool_pages=2048)
    nbd = NbdServer(area, NbdOptions(name="bench", size=SIZE, socket=socket, readahead_pages=readahead))
    await nbd.start()
    http, _ = start_http_server(0, addr="127.0.0.1", registry=nbd.registry)
    print(f"serving; metrics=http://127.0.0.1:{http.server_port}/metrics", flush=True)
    await asyncio.Event().wait()


def readahead_pages(log: Path) -> dict[str, float]:
    """The frontend's read-ahead counters (fetched, hit, dropped), from its metrics."""
    url = re.findall(r"metrics=(http://\S+)", log.read_text())[-1]
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'^netswap_client_readahead_pages_total\{outcome="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {outcome: float(n) for outcome, n in found}


@contextlib.contextmanager
def netswap(tmp: Path, readahead: int, same_pages: bool) -> Iterator[str]:
    """A file-store server and a frontend on it: the NBD URI."""
    grpc_sock, nbd_sock = tmp / "grpc.sock", tmp / "nbd.sock"
    argv = [sys.executable, __file__, "frontend", f"unix:{grpc_sock}", str(nbd_sock), str(readahead)]
    argv += [] if same_pages else ["--whole-pages"]
    with (
        started(server_argv(tmp, grpc_sock, "--capacity", "1GiB"), tmp / "server.log", grpc_sock),
        # the allocator `netswap nbd` re-executes itself with
        started(argv, tmp / "nbd.log", nbd_sock, {**os.environ, **ALLOCATOR_ENV}, marker="serving"),
    ):
        yield f"nbd+unix:///?socket={nbd_sock}"


@contextlib.contextmanager
def nbdkit(tmp: Path) -> Iterator[str]:
    sock = tmp / "kit.sock"
    with started(["nbdkit", "--foreground", "--unix", str(sock), "memory", "512M"], tmp / "kit.log", sock):
        yield f"nbd+unix:///?socket={sock}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "frontend":
        server, socket, readahead = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        loop.run(lambda: frontend(server, socket, readahead, "--whole-pages" not in sys.argv))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hog-same", type=int, default=0, help="percent of the hog's pages same-filled")
    ap.add_argument("--readahead", default="64", help="read-ahead windows (pages) to try, comma-separated")
    ap.add_argument("--same-pages", choices=["on", "both"], default="on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    assets = guest_assets(ROOT / "build" / "guest")
    variants: list[tuple[str, int, bool]] = [("nbdkit memory", 0, False)]
    for readahead in map(int, args.readahead.split(",")):
        variants.append((f"netswap readahead {readahead}", readahead, True))
        if args.same_pages == "both":
            variants.append((f"netswap readahead {readahead}, whole pages", readahead, False))
    results: dict[str, list[dict[str, Any]]] = {}
    for run in range(args.runs):
        for name, readahead, same_pages in variants:
            with tempfile.TemporaryDirectory(prefix="netswap-guest-") as tmp_s:
                tmp = Path(tmp_s)
                with nbdkit(tmp) if name == "nbdkit memory" else netswap(tmp, readahead, same_pages) as uri:
                    r = run_guest(assets, uri, hog_same=args.hog_same)
                    ahead = readahead_pages(tmp / "nbd.log") if name != "nbdkit memory" else {}
            assert r.ok, r.verdict
            results.setdefault(name, []).append(
                {"seconds": r.seconds, "pswpout": r.pswpout, "pswpin": r.pswpin, "readahead": ahead}
            )
            print(f"run {run + 1}: {name}: {r.seconds:.1f} s; load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    kit = statistics.median(r["seconds"] for r in results["nbdkit memory"])
    print(f"\nguest swap test, hog with {args.hog_same}% same-filled pages: medians of {args.runs} runs")
    print(
        f"{'variant':40} {'seconds':>8} {'vs nbdkit':>9} {'pswpout':>8} {'pswpin':>8}"
        f" {'read ahead':>10} {'used':>6} {'of reads':>8}"
    )
    for name, rows in results.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        out = statistics.median(r["pswpout"] or 0 for r in rows)
        back = statistics.median(r["pswpin"] or 0 for r in rows)
        # Read-ahead: pages fetched, the share of them that reads used (accuracy), and the
        # share of the pages swapped in that came from them (coverage).
        fetched = statistics.median(r["readahead"].get("fetched", 0) for r in rows)
        hit = statistics.median(r["readahead"].get("hit", 0) for r in rows)
        used = f"{hit / fetched:6.0%}" if fetched else f"{'':6}"
        covered = f"{hit / back:8.0%}" if back and rows[0]["readahead"] else f"{'':8}"
        print(
            f"{name:40} {seconds:8.1f} {seconds / kit:9.2f} {out:8.0f} {back:8.0f} {fetched:10.0f} {used} {covered}"
        )
    if args.json:
        args.json.write_text(json.dumps({"hog_same": args.hog_same, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
