"""A real Linux guest under QEMU swaps onto a netswap area and survives a memory hog.

The guest (tests/guest/: busybox initramfs, Debian's cloud kernel, a static
hog) gets ~61 MB of RAM and a 512 MiB swap disk, then fills and verifies
280 MiB, so ~120k pages go out to swap and come back. It reports through
QEMU's exit status; the host also checks the server's own count of pages.
The same guest runs on `nbdkit memory` for reference; both wall times are
printed at the end of the session (not asserted: the machines are shared).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.frontend import Frontend, MemoryCgroup, explain_death, fence, hogs_at_the_limit
from tests.guest import walltimes
from tests.guestvm import GuestAssets, GuestResult, guest_assets, run_guest
from tests.helpers import ServerProcess
from tests.nbdenv import nbd_export, require_tools, run

ROOT = Path(__file__).resolve().parents[2]
SECTION = "QEMU TCG, 280 MiB hog, 61 MB RAM"  # run_guest's defaults (-m 96: 61 MB usable)


def assets() -> GuestAssets:
    require_tools()
    return guest_assets(ROOT / "build" / "guest")


def explain(result: GuestResult, *logs: Path) -> str:
    """The verdict, what QEMU itself said, the first errors, the console tail and our logs."""
    lines = result.console.splitlines()
    qemu = [line for line in lines if line.startswith("qemu-system") or ":nbd_" in line][:20]
    errors = [line for line in lines if "error" in line.lower()][:10]
    parts = [result.verdict, "--- QEMU ---", *qemu, "--- first errors ---", *errors]
    parts += ["--- console tail ---", result.console[-3000:]]
    for log in logs:
        parts += [f"--- {log.name} (tail) ---", log.read_text(errors="replace")[-3000:]]
    return "\n".join(parts)


def scrape(log: Path, name: str) -> float:
    url = re.findall(r"metrics=(http://\S+)", log.read_text())[-1]
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


async def test_guest_swaps_onto_nbdkit_memory_for_reference(tmp_path: Path) -> None:
    guest = assets()
    sock = tmp_path / "nbdkit.sock"
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sock), "memory", "512M"])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert nbdkit.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            await asyncio.sleep(0.05)
        result = await asyncio.to_thread(run_guest, guest, f"nbd+unix:///?socket={sock}")
    finally:
        nbdkit.terminate()
        nbdkit.wait(timeout=30)
    assert result.ok, explain(result)
    walltimes.record(SECTION, "nbdkit memory", result, base=True)


async def test_guest_swaps_onto_netswap_and_the_pages_reach_the_server(tmp_path: Path) -> None:
    guest = assets()
    server = ServerProcess(
        tmp_path, tmp_path / "store", "--capacity", "1GiB", "--metrics-listen", "127.0.0.1:0"
    )
    await server.astart()
    try:
        async with nbd_export(server.address, tmp_path / "nbd.sock", size=512 << 20) as export:
            result = await asyncio.to_thread(run_guest, guest, export.uri)
            assert result.ok, explain(result, server.log)
            assert result.pswpout is not None and result.pswpout > 50_000
            # every page the guest swapped out went through netswap's server
            assert scrape(server.log, "netswap_swap_out_pages_total") >= result.pswpout
            assert scrape(server.log, "netswap_swap_in_pages_total") >= (result.pswpin or 0)
            assert export.server.device.failed is None
    finally:
        server.stop_quietly()
    walltimes.record(SECTION, "netswap (file store)", result)


async def test_guest_survives_kill_9_and_restart_of_the_server(tmp_path: Path) -> None:
    guest = assets()
    server = ServerProcess(tmp_path, tmp_path / "store", "--capacity", "1GiB")
    await server.astart()
    try:
        async with nbd_export(server.address, tmp_path / "nbd.sock", size=512 << 20, rpc_timeout=2) as export:
            run = asyncio.ensure_future(asyncio.to_thread(run_guest, guest, export.uri))
            # wait until the guest is swapping hard, then pull the server away
            device = export.server.device
            deadline = time.monotonic() + 300
            while device.rpcs["out"] < 200:
                assert not run.done() and time.monotonic() < deadline, "the guest never started swapping"
                await asyncio.sleep(0.2)
            server.kill9()
            await asyncio.sleep(1.0)
            await server.astart()
            result = await run
            assert result.ok, explain(result, server.log)
            assert device.reattaches == 1 and device.retries > 0
    finally:
        server.stop_quietly()
    walltimes.record(SECTION, "netswap, server killed and restarted", result)


async def test_guest_swaps_through_a_locked_frontend_inside_a_memory_limit(tmp_path: Path) -> None:
    """As above, with `netswap nbd` as its own locked process, fenced into a memory cgroup at
    its footprint plus a margin, next to processes allocating until the limit (see
    test_reserve.py for the arithmetic of that margin)."""
    guest = assets()
    server = ServerProcess(tmp_path, tmp_path / "store", "--capacity", "1GiB")
    await server.astart()
    cgroup = MemoryCgroup()
    # SCHED_FIFO off: a memory cgroup's limit gives a realtime task no reserve, and a busy
    # realtime frontend slows the replacement of OOM-killed hogs, leaving it the only victim.
    nbd = Frontend(tmp_path, server.address, "vm1", "512MiB", "--no-realtime")
    try:
        await nbd.start(cgroup)
        warm = [
            "fio",
            "--name=warm",
            "--ioengine=nbd",
            f"--uri={nbd.uri}",
            "--rw=randrw",
            "--bsrange=4k-256k",
        ]
        await run(*warm, "--iodepth=32", "--size=512M", "--io_size=64M", cwd=tmp_path)
        fence(cgroup, nbd)
        async with hogs_at_the_limit(cgroup):
            result = await asyncio.to_thread(run_guest, guest, nbd.uri)
        assert nbd.alive(), explain_death(nbd)
        assert result.ok, explain(result, nbd.log, server.log)
        assert cgroup.oom_kills >= 1, "the limit was never reached"
        assert nbd.metric("netswap_client_memory_locked_bytes") > 0
    finally:
        if nbd.proc is not None:
            await nbd.stop()
        cgroup.remove()
        server.stop_quietly()
    walltimes.record(SECTION, "netswap, locked frontend in a memory cgroup", result)
