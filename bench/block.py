"""The block path: fio --ioengine=nbd against `netswap nbd` and against `nbdkit memory`, in one run.

    .venv/bin/python bench/block.py [--runs 3] [--seconds 5] [--json out.json]

Workloads: 4k random read and write at iodepth 1 and 32, 64k sequential write
and read. netswap runs as deployed (netswap-server with a file store, `netswap
nbd` locked in memory, unix sockets) but for SCHED_FIFO: fio, the server and
the frontend share this machine's CPUs, where a realtime frontend preempts
the server (in a VM the server is elsewhere). A third table runs the frontend
as deployed, SCHED_FIFO, against that. nbdkit's memory plugin is what a user
would otherwise run. Prints medians of --runs, the ratio netswap/nbdkit, and
the CPU seconds the netswap server and frontend spend per GB moved, and how
often per request the frontend sleeps and is woken (its threads' voluntary
context switches).

A second table takes netswap apart by layers (bench/nbdlayers.py): the same
workloads against a bare Python NBD server (the ceiling of any frontend in
Python here) and against netswap's frontend on an in-process memory area (no
gRPC, no server), with the CPU time per request of each process. At queue
depth 1 it adds the least a Python frontend can do over gRPC (nbdlayers.py's
relay: each request forwarded as it comes, one PageStream message, nothing
else), against a netswap-server like the one above and against
bench/library.py's stream echo (the transport alone): the bound on a qd1
round trip through any Python frontend on that server, or on this transport.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from procs import TOKEN, cpu_seconds, netswap_nbd, server_argv, started, voluntary_switches

WORKLOADS = [
    # name, fio arguments, direction
    ("4k randread qd1", ["--rw=randread", "--bs=4k", "--iodepth=1"], "read"),
    ("4k randread qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "read"),
    ("4k randwrite qd1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], "write"),
    ("4k randwrite qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write"),
    ("64k seq write", ["--rw=write", "--bs=64k", "--iodepth=8"], "write"),
    ("64k seq read", ["--rw=read", "--bs=64k", "--iodepth=8"], "read"),
]
QD1 = [w for w in WORKLOADS if w[0].endswith("qd1")]  # where a request waits for a whole round trip


def fio(uri: str, args: list[str], seconds: float, tmp: Path) -> dict[str, Any]:
    out = tmp / "fio.json"
    subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--size=512M", "--time_based",
         f"--runtime={seconds}", "--output-format=json", f"--output={out}", *args],
        cwd=tmp, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    job: dict[str, Any] = json.loads(out.read_text())["jobs"][0]
    return job


def measure(
    uri: str, tmp: Path, runs: int, seconds: float, pids: list[int], workloads: list[Any] = WORKLOADS
) -> dict[str, dict[str, float]]:
    """Medians per workload; CPU figures are of `pids` in the order server, frontend."""
    # Fill the export once so reads return written data, not holes.
    subprocess.run(
        ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=4",
         "--size=512M", "--output=/dev/null"], cwd=tmp, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(runs):
        for name, args, direction in workloads:
            cpu0 = [cpu_seconds(p) if p else 0.0 for p in pids]
            sleeps0 = voluntary_switches(pids[-1])
            whole = fio(uri, args, seconds, tmp)
            job = whole[direction]
            cpu1 = [cpu_seconds(p) if p else 0.0 for p in pids]
            sleeps = voluntary_switches(pids[-1]) - sleeps0
            moved_gb = job["io_bytes"] / 1e9
            r = results.setdefault(name, {})
            r.setdefault("iops", []).append(job["iops"])
            r.setdefault("mbps", []).append(job["bw_bytes"] / 1e6)
            r.setdefault("lat_p50_us", []).append(job["clat_ns"]["percentile"]["50.000000"] / 1e3)
            r.setdefault("lat_p99_us", []).append(job["clat_ns"]["percentile"]["99.000000"] / 1e3)
            for label, a, b in zip(("server", "frontend"), cpu0, cpu1, strict=False):
                r.setdefault(f"cpu_s_per_gb_{label}", []).append((b - a) / moved_gb if moved_gb else 0.0)
                r.setdefault(f"cpu_us_per_request_{label}", []).append(
                    (b - a) / job["total_ios"] * 1e6 if job["total_ios"] else 0.0
                )
            # fio's own CPU: what is left of two cores for the NBD server's side.
            fio_cpu = (whole["usr_cpu"] + whole["sys_cpu"]) / 100 * whole["job_runtime"] / 1e3
            r.setdefault("cpu_us_per_request_fio", []).append(
                fio_cpu / job["total_ios"] * 1e6 if job["total_ios"] else 0.0
            )
            # How often the frontend (the last pid) slept and was woken per request.
            r.setdefault("sleeps_per_request", []).append(
                sleeps / job["total_ios"] if job["total_ios"] else 0.0
            )
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}


def run_block(runs: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="netswap-block-") as tmp_s:
        tmp = Path(tmp_s)
        # --no-realtime: a SCHED_FIFO frontend preempts the server it shares two
        # CPUs with here (not so in a VM); as deployed is measured too, below.
        with netswap_nbd(tmp, "512MiB", "2GiB", realtime=False) as (server, nbd, uri):
            netswap = measure(uri, tmp, runs, seconds, [server.pid, nbd.pid])
        (tmp / "rt").mkdir()
        with netswap_nbd(tmp / "rt", "512MiB", "2GiB", realtime=True) as (server, nbd, uri):
            realtime = measure(uri, tmp, runs, seconds, [server.pid, nbd.pid])
        kit_sock = tmp / "kit.sock"
        kit_argv = ["nbdkit", "--foreground", "--unix", str(kit_sock), "memory", "512M"]
        with started(kit_argv, tmp / "kit.log", kit_sock) as kit:
            nbdkit = measure(f"nbd+unix:///?socket={kit_sock}", tmp, runs, seconds, [kit.pid])
        layers = {}
        for kind in ("floor", "frontend"):
            sock = tmp / f"{kind}.sock"
            argv = [sys.executable, str(Path(__file__).with_name("nbdlayers.py")), kind, str(sock)]
            with started(argv, tmp / f"{kind}.log", sock) as proc:
                # one process: its CPU is reported as the "frontend"'s
                layers[kind] = measure(f"nbd+unix:///?socket={sock}", tmp, runs, seconds, [0, proc.pid])
        (tmp / "relay").mkdir()
        grpc_sock = tmp / "relay" / "grpc.sock"
        library = Path(__file__).with_name("library.py")
        relay_to = {
            "relay to server": server_argv(tmp / "relay", grpc_sock, "--capacity", "2GiB"),
            "relay to echo": [sys.executable, str(library), "--serve-echo", f"unix:{grpc_sock}"],
        }
        for kind, server_cmd in relay_to.items():
            sock = tmp / "relay" / "nbd.sock"
            env = {**os.environ, "NETSWAP_SERVER": f"unix:{grpc_sock}", "NETSWAP_TOKEN": TOKEN}
            argv = [sys.executable, str(Path(__file__).with_name("nbdlayers.py")), "relay", str(sock)]
            with (
                started(server_cmd, tmp / f"{kind}.server.log", grpc_sock) as server,
                started(argv, tmp / f"{kind}.log", sock, env) as proc,
            ):
                uri = f"nbd+unix:///?socket={sock}"
                layers[kind] = measure(uri, tmp, runs, seconds, [server.pid, proc.pid], QD1)
            for left in (grpc_sock, sock):  # as `started` waits for them to appear
                left.unlink(missing_ok=True)
    return {"netswap": netswap, "nbdkit": nbdkit, "realtime": realtime, **layers}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'workload':18} {'netswap IOPS':>12} {'MB/s':>7} {'p50 us':>7} {'p99 us':>7}"
        f" {'nbdkit IOPS':>12} {'MB/s':>7} {'p50 us':>7} {'ratio':>6} {'srv s/GB':>8} {'nbd s/GB':>8}"
        f" {'nbd sleeps/req':>14}"
    ]
    for name, _, _ in WORKLOADS:
        n, k = result["netswap"][name], result["nbdkit"][name]
        lines.append(
            f"{name:18} {n['iops']:12.0f} {n['mbps']:7.1f} {n['lat_p50_us']:7.0f} {n['lat_p99_us']:7.0f}"
            f" {k['iops']:12.0f} {k['mbps']:7.1f} {k['lat_p50_us']:7.0f} {n['iops'] / k['iops']:6.2f}"
            f" {n['cpu_s_per_gb_server']:8.2f} {n['cpu_s_per_gb_frontend']:8.2f}"
            f" {n['sleeps_per_request']:14.2f}"
        )
    return "\n".join(lines)


def layers_table(result: dict[str, Any]) -> str:
    """IOPS with layers taken away, and the CPU each process spends per request."""
    lines = [
        f"{'workload':18} {'nbdkit':>8} {'py floor':>8} {'frontend':>8} {'netswap':>8}"
        f" {'fio us/req':>10} {'floor us/req':>12} {'frontend us/req':>15} {'netswap nbd us/req':>18}"
        f" {'srv us/req':>10}"
    ]
    for name, _, _ in WORKLOADS:
        k, f, e, n = (result[t][name] for t in ("nbdkit", "floor", "frontend", "netswap"))
        lines.append(
            f"{name:18} {k['iops']:8.0f} {f['iops']:8.0f} {e['iops']:8.0f} {n['iops']:8.0f}"
            f" {n['cpu_us_per_request_fio']:10.1f}"
            f" {f['cpu_us_per_request_frontend']:12.1f} {e['cpu_us_per_request_frontend']:15.1f}"
            f" {n['cpu_us_per_request_frontend']:18.1f} {n['cpu_us_per_request_server']:10.1f}"
        )
    return "\n".join(lines)


def zero_cost_frontend_bound(result: dict[str, Any], name: str) -> dict[str, float]:
    """IOPS two CPUs would allow if netswap's frontend did no work of its own.

    What each request would still cost: fio's CPU, the frontend's gRPC client
    (netswap's frontend minus the same frontend on an in-process area), and the
    server. Assumes both cores fully used and nothing else running: a ceiling.
    """
    n, e = result["netswap"][name], result["frontend"][name]
    fio = n["cpu_us_per_request_fio"]
    client = n["cpu_us_per_request_frontend"] - e["cpu_us_per_request_frontend"]
    server = n["cpu_us_per_request_server"]
    iops = 2 / ((fio + client + server) / 1e6)
    return {
        "fio_us": fio, "grpc_client_us": client, "server_us": server, "iops": iops,
        "vs_nbdkit": iops / result["nbdkit"][name]["iops"],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = run_block(args.runs, args.seconds)
    print(f"block path, medians of {args.runs} runs of {args.seconds:g} s each\n" + table(result))
    print(
        "\nIOPS by layers: a bare Python NBD server, netswap's frontend without gRPC, netswap\n"
        + layers_table(result)
    )
    print("\nThe frontend as deployed (SCHED_FIFO) against --no-realtime, on the same server")
    for name, _, _ in WORKLOADS:
        rt, plain = result["realtime"][name]["iops"], result["netswap"][name]["iops"]
        print(f"{name:18} {rt:9.0f} IOPS against {plain:9.0f}: {rt / plain:5.2f}x")
    print(
        "\nAt queue depth 1: the least a Python frontend does (nbdlayers.py relay), to a server and an echo"
    )
    for name, _, _ in QD1:
        kit, n = result["nbdkit"][name], result["netswap"][name]
        line = [f"{name:18} netswap {n['iops']:6.0f} IOPS p50 {n['lat_p50_us']:4.0f} us"]
        for kind in ("relay to server", "relay to echo"):
            r = result[kind][name]
            line.append(
                f"{kind} {r['iops']:6.0f} p50 {r['lat_p50_us']:4.0f} = {r['iops'] / kit['iops']:.3f}x nbdkit"
            )
        print(", ".join(line))
    result["bounds"] = {}
    for name in ("4k randwrite qd32", "4k randread qd32"):
        b = result["bounds"][name] = zero_cost_frontend_bound(result, name)
        print(
            f"{name}, if the frontend's own work cost nothing: fio {b['fio_us']:.1f} + gRPC client"
            f" {b['grpc_client_us']:.1f} + server {b['server_us']:.1f} us/request on 2 CPUs"
            f" <= {b['iops']:.0f} IOPS = {b['vs_nbdkit']:.2f} x nbdkit"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
