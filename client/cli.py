"""`netswap`: attach, list and detach areas, and a self-checking demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from netswap.client.core import DEFAULT_TIMEOUT, PageArea, TlsFiles
from netswap.client.errors import NetswapError
from netswap.client.fleet import Fleet
from netswap.client.mirror import MirroredArea
from netswap.client.nbd.serve import NBD_MAX_BATCH, NbdOptions, run_nbd
from netswap.client.reserve import ReserveError, before_threads, reserve_safe_process_or_reexec
from netswap.common import logsink, loop
from netswap.common.heap import keep_heap
from netswap.common.limits import PAGE_SIZE
from netswap.common.sizes import format_size, size_arg


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netswap", description="Client for a netswap server.")
    parser.add_argument(
        "--server",
        default=environ.get("NETSWAP_SERVER", "127.0.0.1:50051"),
        help="HOST:PORT or unix:PATH; several as A,B,C; or dns-srv:NAME for a DNS SRV name"
        " [env NETSWAP_SERVER] (default %(default)s)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=int(environ.get("NETSWAP_REPLICAS", "1")),
        help="copies of an area, each on its own server (2: a mirror) [env NETSWAP_REPLICAS] (default %(default)s)",
    )
    parser.add_argument(
        "--failover-timeout",
        type=float,
        default=float(environ.get("NETSWAP_FAILOVER_TIMEOUT", "1")),
        help="mirrored areas: seconds a replica may take to answer before I/O goes on without it"
        " [env NETSWAP_FAILOVER_TIMEOUT] (default %(default)s)",
    )
    parser.add_argument(
        "--dns-server",
        default=environ.get("NETSWAP_DNS_SERVER"),
        help="HOST:PORT of the nameserver for dns-srv: names [env NETSWAP_DNS_SERVER] (default: resolv.conf's)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=environ.get("NETSWAP_TOKEN_FILE"),
        help="file holding the bearer token [env NETSWAP_TOKEN_FILE; or set NETSWAP_TOKEN]",
    )
    for flag, what in (
        ("--tls-ca", "CA (PEM) that signed the server's certificate: use TLS"),
        ("--tls-cert", "client certificate (PEM) for mutual TLS"),
        ("--tls-key", "client private key (PEM) for mutual TLS"),
    ):
        env = "NETSWAP_" + flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, type=Path, default=environ.get(env), help=f"{what} [env {env}]")
    sub = parser.add_subparsers(dest="command", required=True)
    on = sub.add_parser("swapon", help="create or re-attach an area (reserves its space)")
    on.add_argument("name")
    on.add_argument("--size", type=size_arg, required=True, help="e.g. 1GiB")
    sub.add_parser("ls", help="list your areas")
    off = sub.add_parser("swapoff", help="destroy an area and release its space")
    off.add_argument("name")
    demo = sub.add_parser("demo", help="swap random pages out and in, verify every byte, show speed")
    demo.add_argument("--size", type=size_arg, default=64 << 20, help="data to move (default 64MiB)")
    demo.add_argument("--name", default="demo", help="area name (default demo)")
    demo.add_argument("--keep", action="store_true", help="keep the area afterwards")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    nbd = sub.add_parser("nbd", help="export an area over NBD (for nbd-client or QEMU)")
    nbd.add_argument("name")
    nbd.add_argument("--size", type=size_arg, required=True, help="area size, e.g. 1GiB")
    where = nbd.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="unix socket to listen on (only its owner may connect)")
    where.add_argument("--listen", help="HOST:PORT to listen on (loopback, unless --allow-remote)")
    nbd.add_argument(
        "--pool-pages", type=int, default=2048, help="page buffers made at swapon (default 2048)"
    )
    nbd.add_argument(
        "--retry-deadline",
        type=float,
        default=60.0,
        help="seconds a request waits for an unreachable server before failing with EIO (default 60)",
    )
    nbd.add_argument("--rpc-timeout", type=float, default=10.0, help="deadline of one RPC (default 10)")
    nbd.add_argument(
        "--max-rpcs",
        type=int,
        default=NbdOptions.max_rpcs,
        help="RPCs in flight at once (default %(default)s)",
    )
    nbd.add_argument(
        "--readahead-pages",
        type=int,
        default=NbdOptions.readahead_pages,
        help="pages a sequential run first reads ahead (later windows grow to 4x); 0: off (default %(default)s)",
    )
    nbd.add_argument(
        "--no-mlock",
        dest="mlock",
        action="store_false",
        help="do not lock memory (not reserve-safe: tests only)",
    )
    nbd.add_argument(
        "--replace-after",
        type=float,
        default=NbdOptions.replace_after,
        help="mirrored: seconds a copy may be down before the next server takes its place; 0: never"
        " (default %(default)s)",
    )
    nbd.add_argument(
        "--resync-rate",
        type=size_arg,
        default=int(NbdOptions.resync_rate),
        help="mirrored: bytes per second copied to a copy that is behind, e.g. 256MiB (default 384MiB)",
    )
    nbd.add_argument(
        "--max-connections",
        type=int,
        default=NbdOptions.max_connections,
        help="NBD clients served at once (default %(default)s)",
    )
    nbd.add_argument(
        "--handshake-timeout",
        type=float,
        default=NbdOptions.handshake_timeout,
        help="seconds a client has to finish the NBD handshake (default %(default)s)",
    )
    nbd.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --listen take an address other hosts can reach (NBD has no authentication:"
        " whoever reaches it reads and writes the area)",
    )
    nbd.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="do not run SCHED_FIFO (not reserve-safe: for hosts where it would starve others)",
    )
    nbd.add_argument("--metrics-listen", default="", help="HOST:PORT for Prometheus metrics (default: off)")
    return parser


def read_token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    if args.token_file is not None:
        return Path(args.token_file).read_text().strip()
    token = environ.get("NETSWAP_TOKEN", "").strip()
    if not token and args.tls_cert is None:
        raise SystemExit(
            "netswap: no credentials: pass --token-file, set NETSWAP_TOKEN, or use --tls-cert/--tls-key"
        )
    return token or None


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        host = args.server.rpartition(":")[0].strip("[]")
        if not args.server.startswith("unix:") and host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"netswap: warning: no TLS: the token goes to {args.server} in clear (use --tls-ca)",
                file=sys.stderr,
            )
        return None
    return TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, unless forced)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.done, self.enabled = label, total, 0, enabled
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            filled = 30 * self.done // self.total
            pct = 100 * self.done // self.total
            bar = "#" * filled + "." * (30 - filled)
            print(f"\r{self.label:9} [{bar}] {pct:3d}%", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)


def _pattern(seed: int, first_slot: int, nbytes: int) -> bytes:
    # Reproducible test data, not a secret.
    return random.Random(seed * 1_000_003 + first_slot).randbytes(nbytes)  # noqa: S311


async def run_demo(area: PageArea, args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)  # noqa: S311
    total = area.slot_count
    batch = area.max_batch_pages
    ps = area.page_size
    starts = list(range(0, total, batch))
    show = sys.stderr.isatty() or os.environ.get("NETSWAP_PROGRESS") == "1"
    workers = 4
    print(f"area {area.name}: {format_size(area.size_bytes)}, {total} pages, batches of {batch}")

    async def phase(label: str, work: object) -> float:
        progress = Progress(label, total, show)
        queue = list(reversed(starts))
        t0 = time.perf_counter()

        async def worker() -> None:
            while queue:
                start = queue.pop()
                n = min(batch, total - start)
                await work(start, n)  # type: ignore[operator]
                progress.add(n)

        await asyncio.gather(*(worker() for _ in range(workers)))
        return time.perf_counter() - t0

    async def write(start: int, n: int) -> None:
        lease = await area.pool.acquire(n)
        with lease:
            lease.view[:] = _pattern(seed, start, n * ps)
            await area.swap_out(range(start, start + n), lease.view)

    bad: list[int] = []

    async def read(start: int, n: int) -> None:
        expected = _pattern(seed, start, n * ps)
        with await area.swap_in(range(start, start + n)) as pages:
            got = pages.view
            if got != expected:
                for i in range(n):
                    if got[i * ps : (i + 1) * ps] != expected[i * ps : (i + 1) * ps]:
                        bad.append(start + i)

    t_out = await phase("swap out", write)
    t_in = await phase("swap in", read)
    mb = total * ps / 1e6
    print(f"{'':9} {'pages':>8} {'seconds':>8} {'pages/s':>9} {'MB/s':>7}")
    for label, t in (("swap out", t_out), ("swap in", t_in)):
        print(f"{label:9} {total:8d} {t:8.2f} {total / t:9.0f} {mb / t:7.1f}")
    if args.keep:
        area.detach()
    else:
        await area.swapoff()
    if bad:
        print(f"FAILED: {len(bad)} of {total} pages read back wrong (first: slot {min(bad)})")
        return 1
    print(f"verified: all {total} pages read back byte-identical")
    return 0


def nbd_options(args: argparse.Namespace) -> NbdOptions:
    """`netswap nbd`'s options, checked before anything connects or re-executes."""
    if args.pool_pages < 32:
        raise SystemExit("netswap nbd: --pool-pages must be at least 32")
    if not 0 <= args.readahead_pages <= NBD_MAX_BATCH:
        raise SystemExit(f"netswap nbd: --readahead-pages must be 0-{NBD_MAX_BATCH}")
    try:
        return NbdOptions(
            name=args.name,
            size=args.size,
            socket=args.socket,
            listen=args.listen,
            pool_pages=args.pool_pages,
            retry_deadline=args.retry_deadline,
            rpc_timeout=args.rpc_timeout,
            mlock=args.mlock,
            realtime=args.realtime,
            max_rpcs=args.max_rpcs,
            readahead_pages=args.readahead_pages,
            replicas=args.replicas,
            failover_timeout=args.failover_timeout,
            replace_after=args.replace_after,
            resync_rate=args.resync_rate,
            max_connections=args.max_connections,
            handshake_timeout=args.handshake_timeout,
            allow_remote=args.allow_remote,
            metrics_listen=args.metrics_listen,
        )
    except ValueError as e:
        raise SystemExit(f"netswap nbd: {e}") from None


async def run(args: argparse.Namespace, token: str | None) -> int:
    if args.replicas < 1:
        raise SystemExit("netswap: --replicas must be at least 1")
    where = {"tls": tls_files(args), "dns_server": args.dns_server}
    if args.command == "nbd":
        opts = nbd_options(args)
        # Bounded: the frontend keeps at most NbdOptions.max_rpcs RPCs in flight,
        # each of at most NBD_MAX_BATCH pages (servers default to 256). A mirror's
        # replicas answer within the failover timeout, or I/O goes on without them.
        timeout = args.failover_timeout if args.replicas > 1 else args.rpc_timeout
        connect = Fleet.connect(
            args.server,
            token,
            timeout=timeout,
            max_batch_pages=NBD_MAX_BATCH,
            max_rpcs=args.max_rpcs,
            **where,
        )
    else:
        connect = Fleet.connect(args.server, token, timeout=DEFAULT_TIMEOUT, **where)
    async with await connect as fleet:
        if args.command == "nbd":
            return await run_nbd(fleet, opts)
        if args.command == "swapon":
            return await run_swapon(fleet, args)
        if args.command == "ls":
            await run_ls(fleet)
        elif args.command == "swapoff":
            servers = await fleet.swapoff(args.name)
            print(f"destroyed {args.name}" + (f" on {', '.join(servers)}" if fleet.single is None else ""))
        elif args.command == "demo":
            area = await fleet.swapon(args.name, args.size, replicas=args.replicas)
            return await run_demo(area, args)
    return 0


async def run_swapon(fleet: Fleet, args: argparse.Namespace) -> int:
    areas, _ = await fleet.areas()
    existing = next((a for a in areas if a.name == args.name), None)
    if existing is not None and existing.size_bytes == args.size and len(existing.copies) >= args.replicas:
        # Re-attaching would take the area over from whoever uses it
        # (their handle would stop working); reserving is all we want.
        print(f"exists {args.name}: {format_size(args.size)} ({args.size // PAGE_SIZE} pages)")
        return 0
    area = await fleet.swapon(args.name, args.size, replicas=args.replicas, pool_pages=1)
    print(f"created {area.name}: {format_size(args.size)} ({args.size // PAGE_SIZE} pages)")
    if isinstance(area, MirroredArea):
        await area.close()
        for replica in area.replicas:
            print(f"  replica on {replica.server}: {replica.state.value}")
    area.detach()
    return 0


async def run_ls(fleet: Fleet) -> None:
    areas, unreachable = await fleet.areas()
    several = fleet.single is None
    print(f"{'NAME':20} {'SIZE':>10} {'PAGES STORED':>14}" + ("  REPLICAS" if several else ""))
    for a in areas:
        pct = 100 * a.pages_stored * PAGE_SIZE / a.size_bytes
        line = f"{a.name:20} {format_size(a.size_bytes):>10} {a.pages_stored:>8} {pct:4.0f}%"
        if several:
            line += "  " + " ".join(f"{c.server}={c.state}({c.pages_stored})" for c in a.copies)
        print(line)
    for server, error in unreachable.items():
        print(f"unreachable: {server}: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(os.environ).parse_args(argv)
    if args.command == "nbd":
        nbd_options(args)  # a mistake is reported before the process re-executes itself
    if args.command == "nbd" and argv is None:
        reserve_safe_process_or_reexec(sys.argv[1:])  # before any thread exists; see reserve.py
        before_threads(realtime=args.realtime)  # so that gRPC's threads inherit them
    keep_heap()  # see netswap.common.heap (`nbd` has it from its environment already)
    logsink.install(logging.INFO)  # a stalled reader of stderr must not stall the swap device
    token = read_token(args, os.environ)
    try:
        return loop.run(lambda: run(args, token))
    except (NetswapError, ReserveError) as e:
        print(f"netswap: {e}", file=sys.stderr)
        return 1
