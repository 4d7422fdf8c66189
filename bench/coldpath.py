"""netswap's own per-request Python work, in a hot loop and with the CPU caches flushed.

    .venv/bin/python bench/coldpath.py

In the library bench a round trip runs gRPC's threads and a second process
between two requests of the same process, so each request's Python starts
with caches that hold little of it. A hot loop of the same code measures
something else: here, 3-5x less. This runs each side's work for one
request both ways, in one process and without gRPC, against what the
`stored` echo of bench/library.py does in its place:

  server  netswap: a PageStream request parsed and answered (handle and slot
          checks, the memory store, metrics, the reply);
          stored: the stored echo's handler (parse, one copy, the reply)
  client  netswap: Area.swap_out / swap_in through PageStream, on a call that
          answers at once; stored: the stored echo's client (encode, write,
          read, decode, the copy into the caller's buffer)

"cold" flushes the caches between requests by touching 8 MiB. Median us per
request over --rounds x --requests; the difference is netswap's own work, the
part of a request that netswap's code can still make cheaper.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from netswap.client.core import Area, SwapClient
from netswap.client.pool import PagePool
from netswap.common import loop
from netswap.common.limits import PAGE_SIZE
from netswap.common.pagewire import (
    Bounds,
    Op,
    decode_page_reply,
    decode_page_request,
    encode_page_reply,
    encode_page_request,
    encode_page_swap_out,
    slot_fields,
)
from netswap.server.areas import AreaManager
from netswap.server.audit import AuditLog
from netswap.server.auth import Credentials
from netswap.server.fairshare import FairShare
from netswap.server.gate import AuthPolicy, CallLimits, Gate
from netswap.server.metrics import ServerMetrics
from netswap.server.pagestream import PageStreams
from netswap.server.requests import PagePath
from netswap.server.store.memory import MemoryStore
from netswap.v1 import swap_pb2

AREA = 64 << 20
SLOTS = AREA // PAGE_SIZE
_FLUSH = bytearray(8 << 20)  # more than this machine's caches hold


BOUNDS = Bounds.for_batches(4096)  # decoding as the server does, for any batch here


def flush() -> None:
    _FLUSH[::64] = bytes(len(_FLUSH) // 64)  # one write per cache line


class _AnsweringCall:
    """A PageStream call whose every read returns `reply` at once."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    async def write(self, raw: bytes) -> None:
        pass

    async def read(self) -> bytes:
        return self.reply

    def cancel(self) -> bool:
        return True


class _Channel:
    """Just enough of a grpc.aio.Channel for SwapClient: its page stream is `call`."""

    def __init__(self, call: _AnsweringCall) -> None:
        self.call = call

    def stream_stream(self, *args: Any, **kwargs: Any) -> Callable[..., _AnsweringCall]:
        return lambda *a, **k: self.call

    def unary_unary(self, *args: Any, **kwargs: Any) -> None:
        return None


async def timed(fn: Callable[[int], Awaitable[None]], requests: int, cold: bool) -> float:
    """Median seconds of fn(i) over `requests` calls (slot ranges move with i)."""
    times = []
    for i in range(requests):
        if cold:
            flush()
        start = time.perf_counter()
        await fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def server_pair(batch: int, op: str) -> dict[str, Callable[[int], Awaitable[None]]]:
    """(netswap's handler, the stored echo's) for one request of `batch` pages."""
    manager = AreaManager(
        MemoryStore(), capacity=AREA, max_area_size=AREA, max_batch_pages=256, quota_of=lambda p: None
    )
    gate = Gate(Credentials(None), AuthPolicy(), CallLimits(), ServerMetrics(CollectorRegistry()), AuditLog())
    path = PagePath(manager, ServerMetrics(CollectorRegistry()), FairShare())
    streams = PageStreams(manager, gate, path, BOUNDS)
    handle = (await manager.swapon("bench", "area", AREA)).handle
    populate = getattr(mmap, "MAP_POPULATE", 0)
    area = memoryview(mmap.mmap(-1, AREA, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate))
    pages = memoryview(bytes(batch * PAGE_SIZE))
    span = SLOTS - batch

    def request(i: int) -> bytes:
        slots = range((i * batch) % span, (i * batch) % span + batch)
        if op == "out":
            return encode_page_swap_out(handle, slots, [pages], True)
        return encode_page_request(swap_pb2.SwapInRequest(handle=handle, **slot_fields(slots, True)))

    raws = [request(i) for i in range(64)]  # built beforehand: the client's work, not the server's

    async def netswap(i: int) -> None:
        reply = await streams.answer("bench", raws[i % 64])
        manager.settle()  # as PageStreams.serve does once the reply is sent: the same work
        assert reply[:1] in (b"", b"\x1a"), reply[:40]  # no error

    async def stored(i: int) -> None:
        op_name, head, blob = decode_page_request(raws[i % 64], BOUNDS)
        at, size = head.run_start * PAGE_SIZE, head.run_count * PAGE_SIZE
        if op_name is Op.SWAP_OUT:
            area[at : at + size] = blob
            encode_page_reply(())
        else:
            encode_page_reply([area[at : at + size]])

    return {"netswap": netswap, "stored": stored}


async def client_pair(batch: int, op: str) -> dict[str, Callable[[int], Awaitable[None]]]:
    reply = encode_page_reply([bytes(batch * PAGE_SIZE)] if op == "in" else ())
    call = _AnsweringCall(reply)
    client = SwapClient(_Channel(call), "token")  # type: ignore[arg-type]
    handle = os.urandom(16)
    area = Area(
        client, "bench", handle=handle, slot_count=SLOTS, page_size=PAGE_SIZE, max_batch_pages=256,
        created=True, pool=PagePool(256), takes_runs=True,
    )  # fmt: skip
    pages = bytes(batch * PAGE_SIZE)
    buf = memoryview(bytearray(batch * PAGE_SIZE))  # as bench/library.py's stored client copies
    span = SLOTS - batch

    async def netswap(i: int) -> None:
        first = (i * batch) % span
        if op == "out":
            await area.swap_out(range(first, first + batch), pages)
        else:
            await area.swap_in(range(first, first + batch), into=buf)

    async def stored(i: int) -> None:  # bench/library.py's bench_stored_echo
        first = (i * batch) % span
        if op == "out":
            await call.write(
                encode_page_swap_out(handle, range(first, first + batch), [memoryview(pages)], True)
            )
            await call.read()
        else:
            request = swap_pb2.SwapInRequest(handle=handle, **slot_fields(range(first, first + batch), True))
            await call.write(encode_page_request(request))
            buf[:] = decode_page_reply(await call.read())[2]

    return {"netswap": netswap, "stored": stored}


async def run(rounds: int, requests: int) -> None:
    print(f"per-request Python work, median us of {rounds} x {requests} requests (no gRPC)")
    print(
        f"{'side':6} {'op':3} {'batch':>5} {'stored hot':>10} {'netswap hot':>11} {'extra':>6}"
        f" {'stored cold':>11} {'netswap cold':>12} {'extra':>6}"
    )
    for side, pair in (("server", server_pair), ("client", client_pair)):
        for op in ("out", "in"):
            for batch in (1, 64, 256):
                fns = await pair(batch, op)
                got: dict[tuple[str, bool], list[float]] = {}
                for _ in range(rounds):
                    for cold in (False, True):
                        for name, fn in fns.items():
                            await timed(fn, 50, cold)  # settle
                            got.setdefault((name, cold), []).append(await timed(fn, requests, cold))
                us = {key: statistics.median(v) * 1e6 for key, v in got.items()}
                print(
                    f"{side:6} {op:3} {batch:5d} {us['stored', False]:10.1f} {us['netswap', False]:11.1f}"
                    f" {us['netswap', False] - us['stored', False]:6.1f} {us['stored', True]:11.1f}"
                    f" {us['netswap', True]:12.1f} {us['netswap', True] - us['stored', True]:6.1f}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    loop.run(lambda: run(args.rounds, args.requests))


if __name__ == "__main__":
    main()
