# ruff: noqa: E402  (gRPC may load only after grpcenv.apply())
"""Library throughput and latency against the gRPC transport's own ceiling, in one run.

    .venv/bin/python bench/library.py            # or: make bench

For each batch size it measures, with servers in separate processes:
  echo     a minimal gRPC service with netswap's message shapes (one page blob
           + the slots, as a run: netswap.client names a range of slots by
           its first and count) that parses them and stores nothing, one unary
           call per request: the ceiling that gRPC + protobuf in Python put
           on a unary service of this shape
  stream   the same echo as messages on one PageStream call: the ceiling of
           the transport netswap.client uses
  stored   the stream echo doing the copies any store must and nothing else:
           SwapOut's pages into a populated 64 MiB area (once the reply is
           sent, as netswap's memory store does), SwapIn's out of it, and the
           client copying them into its buffer, with slots moving through the
           area as the library bench's do: the ceiling of a store in memory
           on this transport
  filed    the stream echo doing the system calls the file store must and
           nothing else: SwapOut's pages written into a fresh fallocate'd
           area file in the file store's pieces (pwrite_all), SwapIn's read
           with one pread: the ceiling of a store that keeps pages in files
  memory   netswap.client -> netswap-server --store memory
  file     netswap.client -> netswap-server --store file:<tmpdir>
and prints pages/s, p50/p99 latency per request (one in flight, so latency
is the round trip) and the CPU time per request of the server process and
of this (client) process, plus each target's ratio to the echoes and to
its bound (`stored`; the file store's: `filed`), each the median over the
runs of the ratio within a run (the two measured seconds apart). A last
line gives what one 1 MiB copy costs here, in cache and from a random place
in a 64 MiB area: a store makes one on each side of a 256-page request that
the echoes do not, from or into memory its caches do not hold. Every
client runs on netswap's event loop (uvloop, as netswap's own processes do)
and makes a few untimed calls first. Medians of --runs repetitions; the
machine is shared, so compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from netswap.common import grpcenv

grpcenv.apply()  # as netswap's processes do; the echo and the clients here alike

import grpc
from procs import TOKEN, runtime_between, started, thread_runtimes, write_tokens

from netswap.client import SwapClient
from netswap.common import loop
from netswap.common.heap import keep_heap
from netswap.common.limits import PAGE_SIZE, max_message_bytes
from netswap.common.pagewire import (
    Bounds,
    Op,  # the same encoders the library uses
    decode_page_reply,
    decode_page_request,
    encode_page_reply,
    encode_page_request,
    encode_page_swap_out,
    encode_swap_out,
    slot_fields,
)
from netswap.server.store.file import pwrite_all
from netswap.v1 import swap_pb2

BATCHES = (1, 8, 64, 256)
# Each target's bound: the least any store of its kind does on this transport
# (the `vs bound` column). The file store's is `filed`: its system calls.
BOUND = {"echo": "stored", "stream": "stored", "stored": "stored", "memory": "stored"}
BOUND |= {"filed": "filed", "file": "filed"}


# -- the echo ceiling: same shapes, no storage --------------------------------


STORED_AREA = 64 << 20  # the `stored` echo's area: as big as the library's bench areas


async def serve_echo(address: str, stores: bool = False, files: Path | None = None) -> None:
    """Parses requests like netswap does, stores nothing: the gRPC + protobuf ceiling.

    With `stores`, PageStream instead does the copies any store must: SwapOut's
    pages into a populated 64 MiB area at their slots (after the reply),
    SwapIn's out of it into the reply -- and nothing else (no handles,
    checks, metrics). With `files`,
    it does the system calls the file store must instead (filed_stream).
    """
    blob = bytes(256 * PAGE_SIZE)
    populate = getattr(mmap, "MAP_POPULATE", 0)
    area = memoryview(
        mmap.mmap(
            -1, STORED_AREA if stores else PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
        )
    )

    async def swap_out(request: bytes, context: Any) -> bytes:
        swap_pb2.SwapOutRequest.FromString(request)
        return b""

    async def swap_in(request: bytes, context: Any) -> bytes:
        n = swap_pb2.SwapInRequest.FromString(request).run_count
        return swap_pb2.SwapInResponse(pages=blob[: n * PAGE_SIZE]).SerializeToString()

    async def page_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            op, head, _ = decode_page_request(request, BOUNDS)
            yield encode_page_reply([blob[: head.run_count * PAGE_SIZE]] if op is Op.SWAP_IN else ())

    async def stored_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            op, head, pages = decode_page_request(request, BOUNDS)
            # The bench sends runs of consecutive slots: one copy each way.
            at, size = head.run_start * PAGE_SIZE, head.run_count * PAGE_SIZE
            if op is Op.SWAP_OUT:
                yield encode_page_reply(())
                # After the reply, as netswap's memory store copies (the
                # least a store in memory must do before it answers: nothing).
                area[at : at + size] = pages
            else:
                yield encode_page_reply([area[at : at + size]])

    async def filed_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        # A fresh area file per call, as the library bench makes a fresh area
        # per measurement: fallocate'd, advised random, written in the file
        # store's pieces and read with one pread per run -- its I/O, nothing else.
        assert files is not None
        fd, path = tempfile.mkstemp(dir=files)
        try:
            os.posix_fallocate(fd, 0, STORED_AREA)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            async for request in requests:
                op, head, pages = decode_page_request(request, BOUNDS)
                at, size = head.run_start * PAGE_SIZE, head.run_count * PAGE_SIZE
                if op is Op.SWAP_OUT:
                    pwrite_all(fd, [pages], at)  # the file store's own writes
                    yield encode_page_reply(())
                else:
                    yield encode_page_reply([os.pread(fd, size, at)])
        finally:
            os.close(fd)
            os.unlink(path)

    stream = filed_stream if files else stored_stream if stores else page_stream
    handlers = {
        "SwapOut": grpc.unary_unary_rpc_method_handler(swap_out),
        "SwapIn": grpc.unary_unary_rpc_method_handler(swap_in),
        "PageStream": grpc.stream_stream_rpc_method_handler(stream),
    }
    limit = max_message_bytes(256)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("netswap.v1.SwapService", handlers)]
    )
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


# -- measurement ----------------------------------------------------------------


BOUNDS = Bounds.for_batches(4096)  # decoding as the server does, for any batch here


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


WARMUP = 5  # calls per measurement not timed: the stream opening, first buffers


@dataclass
class Timing:
    calls: int
    elapsed: float  # seconds for all calls
    latencies: list[float]
    server_cpu: float  # CPU seconds of the server process over all calls
    client_cpu: float  # and of this one


async def timed(
    one: Callable[[int], Awaitable[None]], server_pid: int, *, seconds: float = 0.0, calls: int = 0
) -> Timing:
    """Call one(i) for `seconds`, or `calls` times, after WARMUP untimed calls."""
    for i in range(WARMUP):
        await one(i)
    lat: list[float] = []
    srv0, cli0 = thread_runtimes(server_pid), time.process_time()
    t0 = time.perf_counter()
    while (len(lat) < calls) if calls else (time.perf_counter() - t0 < seconds):
        s = time.perf_counter()
        await one(len(lat))
        lat.append(time.perf_counter() - s)
    elapsed = time.perf_counter() - t0
    return Timing(
        len(lat), elapsed, lat, runtime_between(srv0, thread_runtimes(server_pid)), time.process_time() - cli0
    )


async def out_then_in(
    w: Callable[[int], Awaitable[None]], r: Callable[[int], Awaitable[None]], server_pid: int, seconds: float
) -> dict[str, Timing]:
    """SwapOuts for `seconds` (a time, not a count: a batch of 256 pages moves ~40x the pages
    of a batch of 1 per second), then as many SwapIns: they read back the slots just written."""
    out = await timed(w, server_pid, seconds=seconds)
    return {"out": out, "in": await timed(r, server_pid, calls=out.calls)}


def copy_cost_us(size: int = 1 << 20, rounds: int = 200, area: int = 64 << 20) -> tuple[float, float]:
    """Median microseconds to copy `size` bytes into a new bytes object (as a reply's join
    does): (from one buffer, in cache; from a random place in an `area`-byte mapping, as a
    store's copies are -- each touches memory the CPU's caches do not hold)."""
    src = memoryview(bytearray(size))
    store = mmap.mmap(-1, area)
    view = memoryview(store)
    view[:] = bytes(area)  # fault every page in first
    hot, cold = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        b"".join((src,))
        hot.append(time.perf_counter() - start)
        at = random.randrange(area // size) * size
        start = time.perf_counter()
        b"".join((view[at : at + size],))
        cold.append(time.perf_counter() - start)
    view.release()
    store.close()
    return statistics.median(hot) * 1e6, statistics.median(cold) * 1e6


async def bench_echo(address: str, server_pid: int, batch: int, seconds: float) -> dict[str, Timing]:
    limit = max_message_bytes(256)
    opts = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    async with grpc.aio.insecure_channel(address, options=opts) as ch:
        out = ch.unary_unary("/netswap.v1.SwapService/SwapOut", None, None)
        inn = ch.unary_unary("/netswap.v1.SwapService/SwapIn", None, None)
        pages = bytes(batch * PAGE_SIZE)
        handle = os.urandom(16)
        md = (("authorization", f"Bearer {TOKEN}"),)
        slots = range(batch)
        body_in = swap_pb2.SwapInRequest(handle=handle, **slot_fields(slots, True)).SerializeToString()

        async def w(i: int) -> None:
            await out(encode_swap_out(handle, slots, [memoryview(pages)], True), metadata=md)

        async def r(i: int) -> None:
            await inn(body_in, metadata=md)

        return await out_then_in(w, r, server_pid, seconds)


@contextlib.asynccontextmanager
async def echo_stream(address: str) -> AsyncIterator[Any]:
    """A PageStream call on a channel of its own, sized for 256-page messages."""
    limit = max_message_bytes(256)
    opts = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    async with grpc.aio.insecure_channel(address, options=opts) as ch:
        call = ch.stream_stream("/netswap.v1.SwapService/PageStream", None, None)(
            None, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        try:
            yield call
        finally:
            call.cancel()


async def bench_stream_echo(address: str, server_pid: int, batch: int, seconds: float) -> dict[str, Timing]:
    async with echo_stream(address) as call:
        pages = memoryview(bytes(batch * PAGE_SIZE))
        handle = os.urandom(16)
        slots = range(batch)
        body_in = encode_page_request(swap_pb2.SwapInRequest(handle=handle, **slot_fields(slots, True)))

        async def w(i: int) -> None:
            await call.write(encode_page_swap_out(handle, slots, [pages], True))
            await call.read()

        async def r(i: int) -> None:
            await call.write(body_in)
            await call.read()

        return await out_then_in(w, r, server_pid, seconds)


async def bench_stored_echo(address: str, server_pid: int, batch: int, seconds: float) -> dict[str, Timing]:
    """The stream echo that stores, driven as bench_netswap drives an area: slots moving
    through the area, SwapIn's pages copied into the caller's buffer."""
    async with echo_stream(address) as call:
        pages = memoryview(bytes(batch * PAGE_SIZE))
        # Copied into through a memoryview, as netswap.client does: a
        # bytearray's own slice assignment copies the source first (~3x the time).
        buf = memoryview(bytearray(batch * PAGE_SIZE))
        handle = os.urandom(16)
        span = STORED_AREA // PAGE_SIZE - batch

        async def w(i: int) -> None:
            first = (i * batch) % span
            await call.write(encode_page_swap_out(handle, range(first, first + batch), [pages], True))
            await call.read()

        async def r(i: int) -> None:
            first = (i * batch) % span
            request = swap_pb2.SwapInRequest(handle=handle, **slot_fields(range(first, first + batch), True))
            await call.write(encode_page_request(request))
            buf[:] = decode_page_reply(cast(bytes, await call.read()))[2]

        return await out_then_in(w, r, server_pid, seconds)


async def bench_netswap(address: str, server_pid: int, batch: int, seconds: float) -> dict[str, Timing]:
    async with await SwapClient.connect(address, TOKEN) as client:
        area = await client.swapon(f"bench{batch}", 64 << 20)
        span = area.slot_count - batch
        # Random pages: zero pages would travel as their word (same-filled pages) and
        # measure no page movement at all.
        pages = os.urandom(batch * PAGE_SIZE)
        buf = bytearray(batch * PAGE_SIZE)

        async def w(i: int) -> None:
            first = (i * batch) % span
            await area.swap_out(range(first, first + batch), pages)

        async def r(i: int) -> None:
            first = (i * batch) % span
            await area.swap_in(range(first, first + batch), into=buf)

        result = await out_then_in(w, r, server_pid, seconds)
        await area.swapoff()
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.5, help="of SwapOuts, then as many SwapIns")
    ap.add_argument("--json", type=Path, help="also write the medians here")
    ap.add_argument("--serve-echo", metavar="ADDRESS", help=argparse.SUPPRESS)
    ap.add_argument("--echo-stores", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--echo-files", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Every process here keeps its heap, as netswap's own do (netswap.common.heap):
    # the clients of all targets share this one, the echo server runs this file.
    keep_heap()
    if args.serve_echo:
        loop.run(lambda: serve_echo(args.serve_echo, args.echo_stores, args.echo_files))
        return 0

    with tempfile.TemporaryDirectory(prefix="netswap-bench-") as tmp_s:
        tmp = Path(tmp_s)
        tokens = write_tokens(tmp)
        server = [sys.executable, "-m", "netswap.server", "--tokens", str(tokens), "--metrics-listen", ""]
        echo = ([sys.executable, __file__, "--serve-echo", f"unix:{tmp}/echo.sock"], tmp / "echo.sock")
        stored = [sys.executable, __file__, "--serve-echo", f"unix:{tmp}/stored.sock", "--echo-stores"]
        (tmp / "filed").mkdir()
        filed = [sys.executable, __file__, "--serve-echo", f"unix:{tmp}/filed.sock", "--echo-files"]
        filed.append(str(tmp / "filed"))
        targets = {
            "echo": echo,
            "stream": echo,
            "stored": (stored, tmp / "stored.sock"),
            "memory": ([*server, "--listen", f"unix:{tmp}/mem.sock", "--store", "memory"], tmp / "mem.sock"),
            "filed": (filed, tmp / "filed.sock"),
            "file": (
                [*server, "--listen", f"unix:{tmp}/file.sock", "--store", f"file:{tmp}/store"],
                tmp / "file.sock",
            ),
        }
        results: dict[tuple[str, int, str], list[tuple[float, ...]]] = {}
        with contextlib.ExitStack() as stack:
            pids: dict[str, int] = {}
            for name, (argv, sock) in targets.items():
                if name != "stream":  # the echo server serves both
                    pids[name] = stack.enter_context(started(argv, tmp / f"{name}.log", sock)).pid
            pids["stream"] = pids["echo"]
            for run in range(args.runs):
                for batch in BATCHES:
                    for name, (_, sock) in targets.items():
                        fn = {
                            "echo": bench_echo,
                            "stream": bench_stream_echo,
                            "stored": bench_stored_echo,
                            "filed": bench_stored_echo,  # the same client; the server differs
                        }.get(name, bench_netswap)
                        # netswap's loop (uvloop), as its own processes run the client
                        res = loop.run(functools.partial(fn, f"unix:{sock}", pids[name], batch, args.seconds))
                        for op, t in res.items():
                            results.setdefault((name, batch, op), []).append(
                                (t.calls * batch / t.elapsed, percentile(t.latencies, 0.5),
                                 percentile(t.latencies, 0.99), t.server_cpu / t.calls, t.client_cpu / t.calls)
                            )  # fmt: skip
                print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    def med(key: tuple[str, int, str], i: int) -> float:
        return statistics.median(r[i] for r in results[key])

    def paired(name: str, base: str, batch: int, op: str, i: int = 0) -> float:
        """The median over runs of measure i of `name` over that of `base` in the same run:
        the two were measured seconds apart, so a slow spell of the machine weighs on both."""
        return statistics.median(
            a[i] / b[i] for a, b in zip(results[name, batch, op], results[base, batch, op], strict=True)
        )

    print(f"\nnetswap library vs gRPC echo ceilings -- medians of {args.runs} runs, one request in flight")
    print(
        f"{'op':4} {'batch':>5} {'target':7} {'pages/s':>9} {'MB/s':>7} {'p50 us':>8} {'p99 us':>8}"
        f" {'vs stream':>9} {'vs bound':>8} {'vs echo':>8} {'srv cpu us':>10} {'cli cpu us':>10}"
    )
    for op in ("out", "in"):
        for batch in BATCHES:
            for name in targets:
                key = (name, batch, op)
                pps = med(key, 0)
                print(
                    f"{op:4} {batch:5d} {name:7} {pps:9.0f} {pps * PAGE_SIZE / 1e6:7.1f}"
                    f" {med(key, 1) * 1e6:8.0f} {med(key, 2) * 1e6:8.0f}"
                    f" {paired(name, 'stream', batch, op):9.2f} {paired(name, BOUND[name], batch, op):8.2f}"
                    f" {paired(name, 'echo', batch, op):8.2f} {med(key, 3) * 1e6:10.0f} {med(key, 4) * 1e6:10.0f}"
                )
    copy_us, copy_cold_us = copy_cost_us()
    print(f"\none 1 MiB copy: {copy_us:.0f} us in cache, {copy_cold_us:.0f} us from a random place in 64 MiB")
    print(f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}; grpcio {grpc.__version__}")
    if args.json:
        out = [
            {"op": op, "batch": batch, "target": name, "pages_per_s": med((name, batch, op), 0),
             "p50_s": med((name, batch, op), 1), "p99_s": med((name, batch, op), 2),
             "server_cpu_s": med((name, batch, op), 3), "client_cpu_s": med((name, batch, op), 4),
             "vs_stream": paired(name, "stream", batch, op), "vs_bound": paired(name, BOUND[name], batch, op),
             "p50_vs_stream": paired(name, "stream", batch, op, 1),
             "copy_1mib_s": copy_us / 1e6, "copy_1mib_cold_s": copy_cold_us / 1e6}
            for (name, batch, op) in results
        ]  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
