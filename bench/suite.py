"""The whole benchmark suite in one command (`make bench`): one table, one JSON, one plot.

    .venv/bin/python bench/suite.py [--runs 3] [--out bench/results]

1. transport ceiling and library   bench/library.py (echoes, stores' bounds, memory and file store)
2. block path                      bench/block.py (fio via NBD: netswap vs nbdkit memory, CPU s/GB)
3. guest                           the QEMU guest swap test on netswap vs on nbdkit memory, and the
                                   same with SAME_PCT of the hog's pages same-filled
4. memory                          bench/memory.py (frontend RSS against 2 GiB of traffic)
5. neighbours                      bench/neighbours.py (a probe tenant's latency under attacks)
6. fleet                           bench/fleet.py (mirrored vs single, failover pause, rebuild rate)

Every comparison is a ratio of numbers measured in the same run on the same
machine; the targets of the performance issue are printed next to them.
Writes OUT/results.json and OUT/results.png.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from procs import netswap_nbd, started  # noqa: E402

from tests.guestvm import guest_assets, run_guest  # noqa: E402  (the same guest the tests boot)


def run_script(name: str, out: Path, *args: str) -> Any:
    target = out / f"{name}.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--json", str(target), *args], check=True
    )
    return json.loads(target.read_text())


SAME_PCT = 15  # a share of same-filled pages as swapped-out memory holds in the wild (mostly zeros)


def guest(runs: int) -> dict[str, Any]:
    """Wall time and pages swapped of the guest test, on netswap and on nbdkit memory; and of the
    same guest whose hog leaves SAME_PCT of its pages same-filled."""
    assets = guest_assets(ROOT / "build" / "guest")
    results: dict[str, list[tuple[float, int]]] = {}
    for _ in range(runs):
        for kind, same in itertools.product(("nbdkit", "netswap"), (0, SAME_PCT)):
            with tempfile.TemporaryDirectory(prefix="netswap-guest-") as tmp_s:
                tmp = Path(tmp_s)
                with contextlib.ExitStack() as stack:
                    if kind == "nbdkit":
                        sock = tmp / "kit.sock"
                        argv = ["nbdkit", "--foreground", "--unix", str(sock), "memory", "512M"]
                        stack.enter_context(started(argv, tmp / "kit.log", sock))
                        uri = f"nbd+unix:///?socket={sock}"
                    else:
                        _, _, uri = stack.enter_context(netswap_nbd(tmp, "512MiB", "1GiB"))
                    r = run_guest(assets, uri, hog_same=same)
                assert r.ok, r.verdict
                results.setdefault(kind + (" same-filled" if same else ""), []).append(
                    (r.seconds, r.pswpout or 0)
                )
    return {
        k: {"seconds": statistics.median(s for s, _ in v), "pswpout": statistics.median(n for _, n in v)}
        for k, v in results.items()
    }


def library_row(lib: list[dict[str, Any]], target: str, op: str, batch: int) -> dict[str, Any]:
    return next(r for r in lib if r["target"] == target and r["op"] == op and r["batch"] == batch)


def summary(res: dict[str, Any]) -> list[tuple[str, float, str, bool, float | None]]:
    """(what, measured ratio or value, target, met, bound) for each of the issue's targets.

    The bound is the same measure for the least any implementation of that
    kind does on this transport (bench/library.py's `stored` and `filed`
    echoes; bench/block.py's relay at queue depth 1 and its frontend that
    costs nothing), where one is measured: a target above its bound is out
    of reach here.
    """
    lib, blk, g = res["library"], res["block"], res["guest"]
    rows: list[tuple[str, float, str, bool, float | None]] = []
    # The ceiling is the echo of the transport the library uses: PageStream.
    # Ratios are paired: the median over runs of the ratio within a run.
    for op in ("out", "in"):
        for batch in (64, 256):
            for store, bound in (("memory", "stored"), ("file", "filed")):
                ratio = library_row(lib, store, op, batch)["vs_stream"]
                most = library_row(lib, bound, op, batch)["vs_stream"]
                what = f"library {store} swap_{op} batch {batch}: pages/s vs stream echo"
                rows.append((what, ratio, ">= 0.80", ratio >= 0.8, most))
        p50 = library_row(lib, "memory", op, 1)["p50_vs_stream"]
        least = library_row(lib, "stored", op, 1)["p50_vs_stream"]
        rows.append(
            (f"library memory swap_{op} batch 1: p50 vs stream echo", p50, "<= 1.25", p50 <= 1.25, least)
        )
    # At queue depth 1 a read waits for a whole round trip: at best what a
    # Python frontend that only forwards each request (bench/nbdlayers.py relay)
    # reaches on the same kind of server, in the same run.
    kit = blk["nbdkit"]["4k randread qd1"]
    iops = blk["netswap"]["4k randread qd1"]["iops"] / kit["iops"]
    most = blk["relay to server"]["4k randread qd1"]["iops"] / kit["iops"]
    rows.append(("block 4k randread qd1: IOPS vs nbdkit", iops, ">= 0.20", iops >= 0.2, most))
    iops = blk["netswap"]["4k randwrite qd32"]["iops"] / blk["nbdkit"]["4k randwrite qd32"]["iops"]
    most = blk["bounds"]["4k randwrite qd32"]["vs_nbdkit"]
    rows.append(("block 4k randwrite qd32: IOPS vs nbdkit", iops, ">= 0.35", iops >= 0.35, most))
    for name in ("64k seq write", "64k seq read"):
        mbps = blk["netswap"][name]["mbps"]
        rows.append((f"block {name}: MB/s", mbps, ">= 300", mbps >= 300, None))
    wall = g["netswap"]["seconds"] / g["nbdkit"]["seconds"]
    rows.append(("guest swap test: wall time vs nbdkit", wall, "<= 1.25", wall <= 1.25, None))
    wall = g["netswap same-filled"]["seconds"] / g["nbdkit same-filled"]["seconds"]
    rows.append(
        (f"guest, {SAME_PCT}% same-filled pages: wall vs nbdkit", wall, "<= 1.25", wall <= 1.25, None)
    )
    for attack in res.get("neighbours", [])[1:]:  # the first row is the baseline
        worst = attack["max"] * 1e3
        fine = (
            attack["failed"] == 0
            and attack["p99"] < 0.02
            and attack["rss_after_mib"] - attack["rss_before_mib"] < 16
        )
        rows.append(
            (f"neighbours {attack['name']}: probe max ms", worst, "< 100", fine and worst < 100, None)
        )
    if "fleet" in res:
        f = res["fleet"]
        if "guest" in f:
            ratio = f["guest"]["mirrored"] / f["guest"]["single"]
            rows.append(("fleet guest wall: mirrored vs single", ratio, "<= 1.15", ratio <= 1.15, None))
        rows.append(("fleet failover pause: s", f["pause_s"], "<= 1.5", f["pause_s"] <= 1.5, None))
        rows.append(
            (
                "fleet rebuild of a lost copy: MiB/s",
                f["resync_mib_s"],
                ">= 200",
                f["resync_mib_s"] >= 200,
                None,
            )
        )
    return rows


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (bench-only dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    lib = res["library"]
    lines = (
        ("echo", "k:"),
        ("stream", "k--"),
        ("stored", "g--"),
        ("filed", "g:"),
        ("memory", "o-"),
        ("file", "s-"),
    )
    for target, style in lines:
        for op in ("out", "in"):
            rows = sorted(
                (r for r in lib if r["target"] == target and r["op"] == op), key=lambda r: r["batch"]
            )
            axes[0].plot([r["batch"] for r in rows], [r["pages_per_s"] for r in rows], style,
                         label=f"{target} swap_{op}", alpha=1.0 if op == "out" else 0.5)  # fmt: skip
    axes[0].set(
        xscale="log", xlabel="pages per call", ylabel="pages/s", title="library vs gRPC echo ceilings"
    )
    axes[0].legend(fontsize=7)
    names = list(res["block"]["netswap"])
    ratios = [res["block"]["netswap"][n]["iops"] / res["block"]["nbdkit"][n]["iops"] for n in names]
    axes[1].barh(names, ratios)
    axes[1].set(xlabel="netswap / nbdkit memory (IOPS)", title="block path (fio over NBD)")
    g = res["guest"]
    kinds = ("nbdkit", "netswap", "nbdkit same-filled", "netswap same-filled")
    labels = [
        k.replace("nbdkit", "nbdkit memory").replace(" same-filled", f"\n{SAME_PCT}% same-filled")
        for k in kinds
    ]
    axes[2].bar(labels, [g[k]["seconds"] for k in kinds])
    axes[2].set(ylabel="seconds", title="QEMU guest swap test (wall time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
        "machine": platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    res: dict[str, Any] = {"machine": machine}
    res["library"] = run_script("library", args.out, "--runs", str(args.runs))
    res["block"] = run_script("block", args.out, "--runs", str(args.runs))
    res["guest"] = guest(args.runs)
    res["memory"] = run_script("memory", args.out)
    res["neighbours"] = run_script("neighbours", args.out)
    res["fleet"] = run_script("fleet", args.out, "--runs", str(max(1, args.runs - 1)))
    res["targets"] = [
        {"what": w, "value": v, "target": t, "met": m, "bound": b} for w, v, t, m, b in summary(res)
    ]
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    plot(res, args.out / "results.png")
    g = res["guest"]
    for same in ("", " same-filled"):
        n, k = g["netswap" + same], g["nbdkit" + same]
        print(f"\nguest swap test{same and f' ({SAME_PCT}% same-filled pages)'}: netswap {n['seconds']:.1f} s"
              f" ({n['pswpout']:.0f} pages out), nbdkit memory {k['seconds']:.1f} s ({k['pswpout']:.0f} pages out)")  # fmt: skip
    print(f"\n{'target':58} {'measured':>9} {'goal':>8}  met {'bound':>6}")
    for row in res["targets"]:
        # Ratios to three places: 0.797 must not print as a goal of 0.80 missed.
        bound = "" if row["bound"] is None else f"{row['bound']:6.3f}"
        value = f"{row['value']:9.3f}" if row["value"] < 10 else f"{row['value']:9.1f}"
        print(f"{row['what']:58} {value} {row['target']:>8}  {'yes' if row['met'] else 'NO ':3} {bound}")
    print(f"\nmachine: {machine}\nwrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
