"""The NBD frontend's memory against data volume: it must stay flat after warm-up.

    .venv/bin/python bench/memory.py [--total 2048] [--step 256]

Starts netswap-server (file store) and `netswap nbd` (locked, as deployed),
warms the frontend up with 100 MiB of fio traffic (the baseline, measured in
the same run), then pushes --total MiB more in --step MiB rounds of random
4k-128k reads and writes at iodepth 32, printing the frontend's VmRSS, VmHWM
and VmLck after each round and the peak's growth over the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import netswap_nbd

MiB = 1 << 20


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmLck"):
            out[key] = int(value.split()[0]) * 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=2048, help="MiB to push after warm-up (default 2048)")
    ap.add_argument("--step", type=int, default=256, help="MiB per round (default 256)")
    ap.add_argument("--json", type=Path, help="also write the rounds here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netswap-membench-") as tmp_s:
        tmp = Path(tmp_s)
        with netswap_nbd(tmp, "1GiB", "2GiB") as (_, nbd, uri):
            return measure(nbd.pid, uri, tmp, args.total, args.step, args.json)


def fio(uri: str, cwd: Path, mib: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["fio", "--name=mem", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bsrange=4k-128k",
         "--iodepth=32", "--size=1G", f"--io_size={mib}M", "--output=/dev/null"],
        cwd=cwd, check=True,
    )  # fmt: skip
    return time.perf_counter() - t0


def measure(pid: int, uri: str, tmp: Path, total: int, step: int, json_out: Path | None) -> int:
    fio(uri, tmp, 100)
    base = status(pid)
    print(
        f"{'MiB moved':>9} {'VmRSS MiB':>10} {'VmHWM MiB':>10} {'VmLck MiB':>10} {'peak growth KiB':>16} {'MB/s':>6}"
    )
    print(
        f"{100:9d} {base['VmRSS'] / MiB:10.1f} {base['VmHWM'] / MiB:10.1f} {base['VmLck'] / MiB:10.1f} {'(baseline)':>16}"
    )
    moved = 100
    growth = 0
    rounds = [{"mib": moved, **base}]
    while moved < 100 + total:
        seconds = fio(uri, tmp, step)
        moved += step
        s = status(pid)
        growth = s["VmHWM"] - base["VmHWM"]
        rounds.append({"mib": moved, **s})
        print(
            f"{moved:9d} {s['VmRSS'] / MiB:10.1f} {s['VmHWM'] / MiB:10.1f} {s['VmLck'] / MiB:10.1f}"
            f" {growth / 1024:16.0f} {step * MiB / seconds / 1e6:6.0f}"
        )
    if json_out is not None:
        json_out.write_text(json.dumps({"rounds": rounds, "peak_growth_bytes": growth}, indent=2))
    verdict = "flat" if growth < 8 * MiB else "GREW"
    print(f"\npeak RSS grew {growth / 1024:.0f} KiB over {total} MiB after warm-up: {verdict} (goal < 8 MiB)")
    return 0 if growth < 8 * MiB else 1


if __name__ == "__main__":
    sys.exit(main())
