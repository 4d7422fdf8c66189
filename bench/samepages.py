# ruff: noqa: E402  (gRPC may load only after grpcenv.apply())
"""Same-filled pages sent as words against sent whole, through the library, in one run.

    .venv/bin/python bench/samepages.py [--same 15] [--batch 8,64] [--link 1gbit] [--runs 4]

A file-store server in its own process; batches of random pages of which
--same percent are same-filled (7 in 8 of those zeros), swapped out and read
back by netswap.client with same_pages on and off, alternately. Prints the
time per page and the CPU per page of the server and of this process. With
--link RATE (root, iproute2) the server runs in a network namespace of its
own behind a veth pair shaped to RATE by tbf on both ends, as a server on
another machine would be: what the words save in bytes shows when the link,
not the CPU, is what a page costs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from netswap.common import grpcenv

grpcenv.apply()

from procs import TOKEN, runtime_between, server_argv, started, thread_runtimes

from netswap.client import SwapClient
from netswap.common import loop
from netswap.common.limits import PAGE_SIZE

NETNS, HOST, PEER = "netswap-bench", "10.231.0.1", "10.231.0.2"
ROUNDS = 150  # batches out, then as many in, per measurement


def pages(count: int, same: int, seed: int) -> bytes:
    """`count` random pages; `same` percent of them (spread evenly) one word repeated."""
    rng = random.Random(seed)
    out = bytearray()
    for n in range(count):
        if n * 37 % 100 < same:
            out += (rng.randbytes(8) if n % 8 == 0 else bytes(8)) * (PAGE_SIZE // 8)
        else:
            out += rng.randbytes(PAGE_SIZE)
    return bytes(out)


async def measure(address: str, server_pid: int, words: bool, batch: int, same: int) -> tuple[float, ...]:
    """(seconds, server CPU seconds, client CPU seconds) per page moved."""
    async with await SwapClient.connect(address, TOKEN, same_pages=words) as client:
        area = await client.swapon(f"same{int(words)}-{batch}", 64 << 20)
        data, back = pages(batch, same, batch), bytearray(batch * PAGE_SIZE)
        span = area.slot_count // batch
        for i in range(3):  # the stream opened, first buffers
            await area.swap_out(range(i * batch, (i + 1) * batch), data)
        server0, client0, start = thread_runtimes(server_pid), time.process_time(), time.perf_counter()
        for i in range(ROUNDS):
            await area.swap_out(range((i % span) * batch, (i % span + 1) * batch), data)
        for i in range(ROUNDS):
            await area.swap_in(range((i % span) * batch, (i % span + 1) * batch), into=back)
        elapsed = time.perf_counter() - start
        server, cpu = runtime_between(server0, thread_runtimes(server_pid)), time.process_time() - client0
        assert back == data
        await area.swapoff()
    moved = 2 * ROUNDS * batch
    return elapsed / moved, server / moved, cpu / moved


def run(*argv: str) -> None:
    subprocess.run(argv, check=True)


@contextlib.contextmanager
def shaped_link(rate: str) -> Iterator[None]:
    """A network namespace reached over a veth pair shaped to `rate` both ways."""
    run("ip", "netns", "add", NETNS)
    try:
        run("ip", "link", "add", "nsb0", "type", "veth", "peer", "name", "nsb1", "netns", NETNS)
        run("ip", "addr", "add", f"{HOST}/24", "dev", "nsb0")
        run("ip", "link", "set", "nsb0", "up")
        for argv in (["ip", "addr", "add", f"{PEER}/24", "dev", "nsb1"], ["ip", "link", "set", "nsb1", "up"]):
            run("ip", "netns", "exec", NETNS, *argv)
        shape = [
            "tc",
            "qdisc",
            "add",
            "dev",
            "{}",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "128kb",
            "latency",
            "20ms",
        ]
        run(*[a.format("nsb0") for a in shape])
        run("ip", "netns", "exec", NETNS, *[a.format("nsb1") for a in shape])
        yield
    finally:
        subprocess.run(["ip", "link", "del", "nsb0"], check=False)
        run("ip", "netns", "del", NETNS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--same", type=int, default=15, help="percent of pages same-filled")
    ap.add_argument("--batch", default="8,64", help="pages per call, comma-separated")
    ap.add_argument("--link", help="e.g. 1gbit: the server behind a link of that rate (needs root)")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netswap-same-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        sock = tmp / "grpc.sock"
        argv = server_argv(tmp, sock)
        address = f"unix:{sock}"
        if args.link:
            stack.enter_context(shaped_link(args.link))
            address = f"{PEER}:50151"
            argv[argv.index("--listen") + 1] = address
            argv = ["ip", "netns", "exec", NETNS, *argv, "--insecure"]  # plaintext off loopback: a lab link
            (tmp / "ready").touch()  # started() waits for a file; the server's port is up within a second
            server = stack.enter_context(started(argv, tmp / "server.log", tmp / "ready"))
            time.sleep(2)
        else:
            server = stack.enter_context(started(argv, tmp / "server.log", sock))
        print(f"{args.same}% same-filled pages, {args.link or 'unix socket'}; medians of {args.runs} runs")
        print(
            f"{'batch':>5} {'as':6} {'us/page':>8} {'MB/s':>7} {'server us/page':>15} {'client us/page':>15}"
        )
        for batch in map(int, args.batch.split(",")):
            got: dict[bool, list[tuple[float, ...]]] = {True: [], False: []}
            for n in range(args.runs):
                for words in (True, False) if n % 2 == 0 else (False, True):
                    one = functools.partial(measure, address, server.pid, words, batch, args.same)
                    got[words].append(loop.run(one))
            for words in (True, False):
                per_page, srv, cli = (statistics.median(r[i] for r in got[words]) for i in range(3))
                print(
                    f"{batch:5} {'words' if words else 'whole':6} {per_page * 1e6:8.2f}"
                    f" {PAGE_SIZE / per_page / 1e6:7.0f} {srv * 1e6:15.2f} {cli * 1e6:15.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
