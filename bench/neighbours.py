"""Hostile neighbours: what one party can do to another tenant's swap latency.

    .venv/bin/python bench/neighbours.py [--seconds 6] [--only NAME ...] [--json OUT]

For each attack a fresh `netswap-server` starts (TCP on loopback, metrics on),
a probe tenant (alice, a separate process) does a 4 KiB SwapOut + SwapIn round
trip through netswap.client every 5 ms, and after a quiet second the attack
runs for --seconds in a process of its own (niced: this measures the server's
isolation, not the kernel's CPU scheduler). The table shows the probe's
latency during the attack beside its latency with nobody else on the server,
failed probe requests, the server's RSS before the attack and once it is
back within the target (or RSS_WAIT seconds after, and how long that took),
and the longest the server's event loop was seen blocked.

Targets: during every attack the probe's max < 100 ms and p99 < 20 ms, no
probe request fails, and RSS returns to within 16 MiB of where it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PS = 4096
TOKENS = {"alice": "alice-probe-token", "bob": "bob-attacker-token", "carol": "carol-bystander-token"}
PROBE_EVERY = 0.005
# gRPC shares one connection between a process's channels to the same target unless told not to.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
TARGET_MAX, TARGET_P99, TARGET_RSS_MIB = 0.100, 0.020, 16.0
RSS_WAIT = 12.0  # seconds after an attack for RSS to come back: several of the server's chore rounds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def write_tokens(directory: Path) -> Path:
    path = directory / "tokens.toml"
    lines = []
    for name, token in TOKENS.items():
        lines += [f"[principals.{name}]", f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def scrape(port: int) -> dict[str, float]:
    """name{labels} -> value of the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    store_root: Path | None


@contextlib.contextmanager
def server(tmp: Path, store: str, *extra: str) -> Iterator[Server]:
    port, metrics_port = free_port(), free_port()
    root = tmp / "store" if store == "file" else None
    argv = [
        sys.executable, "-m", "netswap.server",
        "--listen", f"127.0.0.1:{port}",
        "--store", f"file:{root}" if root else "memory",
        "--capacity", "4GiB", "--max-area-size", "2GiB",
        "--tokens", str(write_tokens(tmp)),
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(metrics_port)
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield Server(proc, f"127.0.0.1:{port}", metrics_port, root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the probe (its own process) -------------------------------------------------------


async def probe_main(address: str, out: Path) -> None:
    from netswap.client import SwapClient  # noqa: PLC0415 (after grpcenv)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    samples: list[tuple[float, float]] = []  # (when it started, seconds; -1 failed)
    errors: list[str] = []
    async with await SwapClient.connect(address, TOKENS["alice"], timeout=30) as client:
        area = await client.swapon("probe", 64 * PS, pool_pages=8)
        page, back = bytearray(PS), bytearray(PS)
        print("probe ready", flush=True)
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            slot = n % 64
            page[:8] = n.to_bytes(8, "little")
            start = time.monotonic()
            try:
                await area.swap_out(range(slot, slot + 1), page)
                await area.swap_in(range(slot, slot + 1), into=back)
                if back != page:
                    raise RuntimeError(f"slot {slot} read back wrong data")
                samples.append((start, time.monotonic() - start))
            except Exception as e:  # every failure is a result
                samples.append((start, -1.0))
                errors.append(f"{type(e).__name__}: {e}")
            n += 1
            next_at = max(next_at + PROBE_EVERY, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_at - time.monotonic())
    result = json.dumps({"samples": samples, "errors": errors[:20]})
    await asyncio.to_thread(out.write_text, result)


@contextlib.contextmanager
def probe(tmp: Path, address: str) -> Iterator[Callable[[], dict[str, Any]]]:
    out = tmp / "probe.json"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--probe", address, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if "probe ready" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("the probe did not start")
    result: dict[str, Any] = {}

    def finish() -> dict[str, Any]:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        result.update(json.loads(out.read_text()))
        return result

    try:
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the attacks (each in its own, niced process) -------------------------------------

Attack = Callable[[str, float, dict[str, Any]], Coroutine[Any, Any, None]]
ATTACKS: dict[str, tuple[str, str, Attack]] = {}  # name -> (store, what it does, coroutine)


def attack(name: str, store: str, what: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS[name] = (store, what, fn)
        return fn

    return register


def _meta(principal: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[principal]}"),) if principal else ()


def many_fields_body(size: int) -> bytes:
    """A SwapOutRequest of one-byte varint fields (slots, unpacked: 2 bytes each), `size` bytes."""
    return b"\x10\x00" * (size // 2)


async def _until(seconds: float, worker: Callable[[], Awaitable[None]], n: int) -> None:
    end = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < end:
            await worker()

    await asyncio.gather(*(loop() for _ in range(n)))


async def _fields(address: str, seconds: float, principal: str | None) -> None:
    import grpc  # noqa: PLC0415

    from netswap.common.limits import max_message_bytes  # noqa: PLC0415

    body = many_fields_body(2 * max_message_bytes(256) - 64)  # just under the server's receive limit
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", len(body) + 64)]
    ) as channel:
        call = channel.unary_unary("/netswap.v1.SwapService/SwapOut", None, None)

        async def one() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call(body, metadata=_meta(principal), timeout=30)

        await _until(seconds, one, 8)


@attack("unauth-fields", "memory", "no token: unary SwapOuts of 1.1M one-byte fields, 8 at a time")
async def unauth_fields(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    await _fields(address, seconds, None)


@attack("authed-fields", "memory", "tenant: unary SwapOuts of 1.1M one-byte fields, 8 at a time")
async def authed_fields(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    await _fields(address, seconds, "bob")


@attack("wrong-token-flood", "memory", "3,000 concurrent calls with a wrong token, over 50 connections")
async def wrong_token_flood(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    import grpc  # noqa: PLC0415

    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(50)]
    calls = [c.unary_unary("/netswap.v1.SwapService/ListAreas", None, None) for c in channels]
    bad = (("authorization", "Bearer not-a-token"),)

    async def one(i: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await calls[i % len(calls)](b"", metadata=bad, timeout=30)

    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            await asyncio.gather(*(one(i) for i in range(3000)))
    finally:
        for c in channels:
            await c.close(None)


async def _churn(address: str, seconds: float) -> None:
    from netswap.client import SwapClient  # noqa: PLC0415
    from netswap.client.errors import NoSpace  # noqa: PLC0415

    async with await SwapClient.connect(address, TOKENS["bob"], timeout=60) as client:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            try:
                area = await client.swapon(f"churn{n % 2}", 1 << 30, pool_pages=8)
            except NoSpace:  # the SwapOn rate limit
                await asyncio.sleep(0.1)
                continue
            await area.swapoff()
            n += 1


@attack("swapon-churn-memory", "memory", "tenant: SwapOn + SwapOff of 1 GiB areas, back to back")
async def churn_memory(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    await _churn(address, seconds)


@attack("swapon-churn-file", "file", "tenant: SwapOn + SwapOff of 1 GiB areas, back to back")
async def churn_file(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    await _churn(address, seconds)


@attack("big-batches", "memory", "tenant: 64 PageStreams on 8 connections, 256-page SwapOuts and SwapIns")
async def big_batches(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    from netswap.client import SwapClient  # noqa: PLC0415

    clients = [
        await SwapClient.connect(address, TOKENS["bob"], timeout=60, options=OWN_CONNECTION) for _ in range(8)
    ]
    try:
        areas = [await c.swapon(f"big{i}", 4096 * PS, pool_pages=512) for i, c in enumerate(clients)]
        blob = os.urandom(256 * PS)
        end = time.monotonic() + seconds

        async def stream(area: Any, k: int) -> None:
            # One PageStream per client: 8 callers on each keep 8 requests in flight on it.
            n = k
            while time.monotonic() < end:
                first = (n * 256) % 4096
                if n % 2:
                    await area.swap_out(range(first, first + 256), blob)
                else:
                    lease = await area.swap_in(range(first, first + 256))
                    lease.release()
                n += 1

        await asyncio.gather(*(stream(a, k) for a in areas for k in range(8)))
        for area in areas:  # their memory back: what stays is what the attack cost
            await area.swapoff()
    finally:
        for c in clients:
            await c.close()


async def _half_sent(address: str, seconds: float, principal: str | None) -> None:
    """Many calls whose headers arrive and whose body never does: 1 MiB announced, 16 KiB sent."""
    import h2.config  # noqa: PLC0415
    import h2.connection  # noqa: PLC0415

    host, _, port = address.rpartition(":")
    conns = []
    for _ in range(32):
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            break  # refused: that is a result too
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        h2c.initiate_connection()
        for i in range(64):
            sid = 1 + 2 * i
            headers = [
                (":method", "POST"), (":scheme", "http"), (":authority", address),
                (":path", "/netswap.v1.SwapService/SwapOut"),
                ("content-type", "application/grpc"), ("te", "trailers"),
            ]  # fmt: skip
            if principal:
                headers.append(("authorization", f"Bearer {TOKENS[principal]}"))
            h2c.send_headers(sid, headers)
            with contextlib.suppress(Exception):  # the window may be smaller
                h2c.send_data(sid, b"\x00" + (1 << 20).to_bytes(4, "big") + bytes(16 * 1024 - 5))
        writer.write(h2c.data_to_send())
        await writer.drain()
        conns.append((reader, writer))
    await asyncio.sleep(seconds)
    for _, writer in conns:
        writer.close()


@attack("half-sent-unauth", "memory", "no token: 32 connections x 64 calls, bodies never finished")
async def half_sent_unauth(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    await _half_sent(address, seconds, None)


@attack("half-sent-authed", "memory", "tenant: 32 connections x 64 calls, bodies never finished")
async def half_sent_authed(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    await _half_sent(address, seconds, "bob")


@attack("cold-file-reads", "file", "tenant: random 4 KiB SwapIns, 64 in flight, of a 1 GiB area out of cache")
async def cold_reads(address: str, seconds: float, ctx: dict[str, Any]) -> None:
    from netswap.client import SwapClient  # noqa: PLC0415

    data_file = Path(ctx["data_file"])
    async with await SwapClient.connect(address, TOKENS["bob"], timeout=60) as client:
        area = await client.swapon("cold", 1 << 30, pool_pages=128)
        fd = os.open(data_file, os.O_RDONLY)
        try:
            end = time.monotonic() + seconds
            rng = random.Random(1)
            evicted = 0.0

            async def reader() -> None:
                buf = bytearray(PS)
                while time.monotonic() < end:
                    slot = rng.randrange(area.slot_count)
                    await area.swap_in(range(slot, slot + 1), into=buf)

            async def evict() -> None:
                nonlocal evicted
                while time.monotonic() < end:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    evicted += 1
                    await asyncio.sleep(0.5)

            await asyncio.gather(evict(), *(reader() for _ in range(64)))
        finally:
            os.close(fd)


async def prepare_cold(address: str, store_root: Path) -> dict[str, Any]:
    """Fill bob's 1 GiB area `cold` and push it out of the page cache."""
    from netswap.client import SwapClient  # noqa: PLC0415

    async with await SwapClient.connect(address, TOKENS["bob"], timeout=120) as client:
        area = await client.swapon("cold", 1 << 30, pool_pages=512)
        blob = os.urandom(256 * PS)
        for first in range(0, area.slot_count, 256):
            await area.swap_out(range(first, first + 256), blob)
        area.detach()
    data_file = store_root / b"bob".hex() / (b"cold".hex() + ".data")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"data_file": str(data_file)}


def attack_main(name: str, address: str, seconds: float, ctx: dict[str, Any]) -> None:
    os.nice(10)
    asyncio.run(ATTACKS[name][2](address, seconds, ctx))


# -- the runs ------------------------------------------------------------------------------


def window(samples: list[list[float]], start: float, end: float) -> dict[str, float]:
    got = [s for t, s in samples if start <= t < end]
    ok = sorted(s for s in got if s >= 0)
    if not ok:
        return {
            "n": len(got),
            "failed": len(got),
            "p50": float("nan"),
            "p99": float("nan"),
            "max": float("nan"),
        }
    return {
        "n": len(got),
        "failed": len(got) - len(ok),
        "p50": statistics.median(ok),
        "p99": ok[min(len(ok) - 1, int(0.99 * len(ok)))],
        "max": ok[-1],
    }


def run_one(name: str, seconds: float) -> dict[str, Any]:
    store, what, _ = ATTACKS[name] if name != "baseline" else ("memory", "nothing", None)
    with tempfile.TemporaryDirectory(prefix="netswap-neighbours-") as tmp_s:
        tmp = Path(tmp_s)
        with server(tmp, store) as srv:
            ctx: dict[str, Any] = {}
            if name == "cold-file-reads":
                assert srv.store_root is not None
                ctx = asyncio.run(prepare_cold(srv.address, srv.store_root))
            with probe(tmp, srv.address) as finish:
                time.sleep(1.0)
                rss_before = rss_mib(srv.proc.pid)
                start = time.monotonic()
                if name == "baseline":
                    time.sleep(seconds)
                else:
                    subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--attack",
                            name,
                            srv.address,
                            str(seconds),
                            json.dumps(ctx),
                        ],
                        check=True,
                        timeout=seconds + 120,
                    )
                end = time.monotonic()
                # The server gives a burst's memory back every few seconds (its chores):
                # the first reading within the target, or the last of RSS_WAIT seconds.
                while True:
                    time.sleep(1.0)
                    rss_after = rss_mib(srv.proc.pid)
                    waited = time.monotonic() - end
                    if rss_after - rss_before < TARGET_RSS_MIB or waited > RSS_WAIT:
                        break
                metrics = scrape(srv.metrics_port)
                result = finish()
            stats = window(result["samples"], start, end)
    blocked = metrics.get("netswap_event_loop_lag_max_seconds")
    return {
        "name": name,
        "store": store,
        "what": what,
        "attack_seconds": end - start,
        **stats,
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "rss_back_s": waited,
        "loop_blocked_max_s": blocked,
        "errors": result["errors"],
    }


def print_table(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    print(
        f"{'attack':22} {'store':6} {'probes':>6} {'fail':>4} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}"
        f" {'base p99':>8} {'base max':>8} {'rss before':>10} {'after':>7} {'in s':>4} {'loop max ms':>11}  met"
    )
    for r in rows:
        met = (
            r["failed"] == 0
            and r["max"] < TARGET_MAX
            and r["p99"] < TARGET_P99
            and r["rss_after_mib"] - r["rss_before_mib"] < TARGET_RSS_MIB
        )
        blocked = "" if r["loop_blocked_max_s"] is None else f"{r['loop_blocked_max_s'] * 1e3:.1f}"
        print(
            f"{r['name']:22} {r['store']:6} {r['n']:6d} {r['failed']:4d} {r['p50'] * 1e3:7.2f}"
            f" {r['p99'] * 1e3:7.2f} {r['max'] * 1e3:7.1f} {baseline['p99'] * 1e3:8.2f}"
            f" {baseline['max'] * 1e3:8.1f} {r['rss_before_mib']:10.1f} {r['rss_after_mib']:7.1f}"
            f" {r['rss_back_s']:4.0f} {blocked:>11}  {'yes' if met or r['name'] == 'baseline' else 'NO'}"
        )
    for r in rows:
        for e in r["errors"][:3]:
            print(f"  {r['name']}: probe error: {e}")
    print(
        f"targets: probe max < {TARGET_MAX * 1e3:.0f} ms, p99 < {TARGET_P99 * 1e3:.0f} ms, no failure,"
        f" RSS back within {TARGET_RSS_MIB:.0f} MiB"
    )


def main() -> int:
    from netswap.common import grpcenv  # noqa: PLC0415

    grpcenv.apply()
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        from netswap.common import loop  # noqa: PLC0415

        loop.run(lambda: probe_main(sys.argv[2], Path(sys.argv[3])))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--attack":
        attack_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each attack runs")
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="run only these attacks")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    names = args.only or list(ATTACKS)
    rows = [run_one("baseline", args.seconds)]
    for name in names:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(run_one(name, args.seconds))
    print_table(rows, rows[0])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
