"""Swap from inside the VM: the guest kernel's nbd driver, served by `netswap nbd` in the same guest.

This is the arrangement deploy/vm/ ships, and the one that can deadlock: the
frontend serves the very device its own memory would be reclaimed to, and
its sends to the server allocate while memory is short. The guest (Debian's
cloud kernel under QEMU TCG, a root disk built from this host's Python and
the project's virtualenv by rootfs.py) reaches the server on the host
through QEMU's user network, starts the units' own commands (units.py),
and runs a hog of about 2.5x its RAM that writes every page and verifies it.

Pass: every page verifies; no hung task, stuck NBD request or OOM kill in
the console; pswpout is large; the frontend's startup line reports its
PR_SET_IO_FLUSHER, SCHED_FIFO and oom_score_adj -1000 in force, and the
guest, reading /proc from outside it, finds IO_FLUSHER and SCHED_FIFO on
every one of its threads (they are per thread: see client/reserve.py). The second case
kills and restarts the server mid-run. The same guest also swaps through a
frontend on the host (QEMU as the NBD client) for comparison; wall times are
printed at the end of the session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.frontend import Frontend, explain_death
from tests.guest import walltimes
from tests.guest.rootfs import build_rootfs
from tests.guest.units import parse_env_file, script
from tests.guestvm import (
    MODULES,
    GuestResult,
    boot,
    build_hog,
    build_initramfs,
    input_key,
    kernel,
    remove_stale,
)
from tests.helpers import TOKENS, ServerProcess, free_port
from tests.nbdenv import require_tools

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "build" / "guest"
GUEST_SRC = Path(__file__).resolve().parent
DEPLOY = ROOT / "deploy" / "vm"
UNITS = [DEPLOY / "netswap-nbd.service", DEPLOY / "netswap-swap.service"]
ENV_PATH = "/etc/netswap/nbd.env"  # where both units read it
# The sysctls the VM set-up installs (docs/nbd.md); the guest applies them before swapping.
SYSCTL = {"sysctl.conf": (DEPLOY / "90-netswap.conf").read_text()}
HOST_FROM_GUEST = "10.0.2.2"  # QEMU user networking: the host's loopback, seen from the guest

MEMORY_MB = 256
HOG_MIB = 640  # 2.5x the RAM; the frontend locks ~75 MiB of it
MIN_PSWPOUT = 50_000
# Under half full: a page read back keeps its slot, and going out again costs no write
# (the kernel frees the slots of a swap device over half full): the same pressure, less time.
AREA_SIZE = "2GiB"
SECTION = f"QEMU TCG, {HOG_MIB} MiB hog, {MEMORY_MB} MiB RAM"

pytestmark = [pytest.mark.inside_vm, pytest.mark.timeout(900)]


@dataclasses.dataclass(frozen=True)
class Assets:
    kernel: Path
    initramfs: Path
    rootfs: Path


@functools.cache
def assets() -> Assets:
    require_tools()
    k = kernel(BUILD)
    hog = build_hog(BUILD)
    rootfs = build_rootfs(BUILD, k, hog)
    init = GUEST_SRC / "boot.sh"
    key = input_key(init.read_bytes(), k.version.encode(), " ".join(MODULES).encode())
    initramfs = BUILD / f"boot-{key}.cpio.gz"
    if not initramfs.exists():
        build_initramfs(initramfs, k.moddir, {"init": init}, MODULES)
        remove_stale(BUILD, "boot-*.cpio.gz", initramfs)
    return Assets(kernel=k.image, initramfs=initramfs, rootfs=rootfs)


def env_file(server: str, area: str) -> str:
    """deploy/vm/nbd.env.example with this test's server and area; other values as shipped."""
    text = (DEPLOY / "nbd.env.example").read_text()
    ours = {"NETSWAP_SERVER": server, "NETSWAP_AREA": area, "NETSWAP_SIZE": AREA_SIZE}
    shipped = parse_env_file(text)
    assert set(ours) <= set(shipped), f"nbd.env.example lacks {set(ours) - set(shipped)}"
    assert shipped["NETSWAP_TOKEN_FILE"].startswith("/etc/netswap/"), "the guest's config lives there"
    for key, value in ours.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
    return text


def initrd_with_config(tmp_path: Path, base: Path, files: dict[str, str]) -> Path:
    """base with a cpio archive of config/ appended (the kernel unpacks both): boot.sh
    copies it to /etc/netswap on the root disk."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        root = Path(tmp)
        (root / "config").mkdir()
        for name, text in files.items():
            (root / "config" / name).write_text(text)
            (root / "config" / name).chmod(0o600)
        names = ["config", *(f"config/{n}" for n in files)]
        busybox = shutil.which("busybox")
        assert busybox, "busybox missing: `make test` installs busybox-static"
        proc = subprocess.run(
            [busybox, "cpio", "-o", "-H", "newc"],
            cwd=root,
            input="\n".join(names).encode(),
            capture_output=True,
        )
        assert proc.returncode == 0, proc.stderr
    data = base.read_bytes()
    initrd = tmp_path / "initrd"
    initrd.write_bytes(data + b"\0" * (-len(data) % 4) + proc.stdout)  # archives start 4-byte aligned
    return initrd


def boot_guest(tmp_path: Path, swap: str, config: dict[str, str], devices: list[str]) -> GuestResult:
    """The guest with the root disk, this boot's config, and devices; swap=nbd or vdb (inside_vm.sh)."""
    a = assets()
    return boot(
        a.kernel,
        initrd_with_config(tmp_path, a.initramfs, config),
        f"swap={swap} hog_mib={HOG_MIB} min_pswpout={MIN_PSWPOUT}",
        ["-drive", f"file={a.rootfs},format=raw,if=virtio,readonly=on", *devices],
        memory_mb=MEMORY_MB,
        timeout=800,
        console_log=tmp_path / "console.log",
    )


def run_inside(tmp_path: Path, server: ServerProcess, area: str) -> GuestResult:
    port = server.address.rpartition(":")[2]
    env_text = env_file(f"{HOST_FROM_GUEST}:{port}", area)
    env = parse_env_file(env_text)
    config = {
        **SYSCTL,
        "nbd.env": env_text,
        Path(env["NETSWAP_TOKEN_FILE"]).name: TOKENS["alice"] + "\n",
        "units.sh": script(UNITS, ENV_PATH, env),
    }
    # QEMU's user network: the guest's connections to 10.0.2.2 reach the host's loopback.
    network = ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    return boot_guest(tmp_path, "nbd", config, network)


def explain(result: GuestResult, *logs: Path) -> str:
    lines = result.console.splitlines()
    marks = r"error|fail|blocked for|stuck|oom|STALLWATCH|WARNING"
    errors = [line for line in lines if re.search(marks, line, re.IGNORECASE)][:30]
    parts = [result.verdict, "--- first errors ---", *errors, "--- console tail ---", result.console[-6000:]]
    for log in logs:
        parts += [f"--- {log.name} (tail) ---", log.read_text(errors="replace")[-3000:]]
    return "\n".join(parts)


def check_no_stall(result: GuestResult, *logs: Path) -> None:
    """The guest passed, and nothing in it waited long or was killed on the way."""
    assert result.ok, explain(result, *logs)
    stalls = r"blocked for more than|Possible stuck request|STALLWATCH no swap|Out of memory|oom-kill|Killed process"
    assert not re.search(stalls, result.console), explain(result, *logs)
    assert result.pswpout is not None and result.pswpout > MIN_PSWPOUT, result.verdict


def frontend_report(console: str) -> dict[str, dict[str, str]]:
    """The guest's FRONTEND lines: {when: {field: value}}."""
    found: dict[str, dict[str, str]] = {}
    for when, rest in re.findall(r"^FRONTEND (\S+) (.*)$", console, re.MULTILINE):
        fields = found.setdefault(when, {})
        for key, value in re.findall(r"(\w+)[=:](\S+)", rest):
            fields[key] = value
    return found


def check_inside(result: GuestResult, *logs: Path, warnings: str = "") -> dict[str, dict[str, str]]:
    """Every pass condition of a guest that swapped through its own frontend; its FRONTEND lines.

    warnings: a pattern for the frontend's WARNING lines this case expects; any other fails.
    """
    check_no_stall(result, *logs)
    console = result.console
    # The frontend's own startup line: its own prctl, sched and oom_score_adj calls succeeded.
    startup = re.findall(r"^netswap nbd: serving .*$", console, re.MULTILINE)
    assert len(startup) == 1, explain(result, *logs)
    for part in ("mlockall on", "IO_FLUSHER set", "SCHED_FIFO on", "oom_score_adj -1000"):
        assert part in startup[0], startup[0]
    unexpected = [
        w
        for w in re.findall(r"^.* WARNING .*$", console, re.MULTILINE)
        if not (warnings and re.search(warnings, w))
    ]
    assert not unexpected, explain(result, *logs)
    # And, read from outside it, still so after the hog, on every thread.
    report = frontend_report(console)
    for when in ("swapon", "after-hog"):
        seen = report[when]
        assert seen["oom_score_adj"] == "-1000", (when, seen)
        assert seen["io_flusher_threads"] == seen["threads"], (when, seen)
        assert seen["fifo_threads"] == seen["threads"], (when, seen)
        assert int(seen["VmLck"]) > 0, (when, seen)
    return report


def note(report: dict[str, dict[str, str]]) -> str:
    after = report["after-hog"]
    mib = {k: int(after[k]) >> 10 for k in ("VmLck", "VmRSS", "VmHWM")}
    return f"frontend VmRSS {mib['VmRSS']} MiB (peak {mib['VmHWM']}), VmLck {mib['VmLck']} MiB"


def tcp_server(tmp_path: Path) -> ServerProcess:
    """netswap-server on a loopback port: the guest reaches it as 10.0.2.2:PORT."""
    return ServerProcess(
        tmp_path, tmp_path / "store", "--capacity", "4GiB", listen=f"127.0.0.1:{free_port()}"
    )


async def console_shows(tmp_path: Path, pattern: str, guest: asyncio.Future[GuestResult]) -> None:
    """Wait until the running guest's console matches pattern (fails if the guest ends first)."""
    log = tmp_path / "console.log"
    while not (log.exists() and re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)):
        assert not guest.done(), "the guest ended before: " + pattern
        await asyncio.sleep(0.5)


async def test_guest_swaps_through_a_frontend_on_the_host_for_comparison(tmp_path: Path) -> None:
    """The same guest, kernel and hog, but QEMU is the NBD client and `netswap nbd` runs on the host."""
    server = tcp_server(tmp_path)
    await server.astart()
    nbd = Frontend(tmp_path, server.address, "host-side", AREA_SIZE)
    try:
        await nbd.start()
        disk = ["-drive", f"file={nbd.uri.replace(',', ',,')},format=raw,if=virtio,cache=none"]
        result = await asyncio.to_thread(boot_guest, tmp_path, "vdb", SYSCTL, disk)
        assert nbd.alive(), explain_death(nbd)
    finally:
        if nbd.proc is not None:
            await nbd.stop()
        server.stop_quietly()
    check_no_stall(result, nbd.log, server.log)
    walltimes.record(SECTION, "netswap nbd on the host (QEMU's NBD client)", result, base=True)


async def test_guest_swaps_through_netswap_nbd_running_inside_it(tmp_path: Path) -> None:
    server = tcp_server(tmp_path)
    await server.astart()
    try:
        result = await asyncio.to_thread(run_inside, tmp_path, server, "inside")
    finally:
        server.stop_quietly()
    report = check_inside(result, server.log)
    walltimes.record(SECTION, "netswap nbd inside the guest", result, note(report))


async def test_guest_keeps_swapping_through_its_frontend_while_the_server_restarts(tmp_path: Path) -> None:
    server = tcp_server(tmp_path)
    await server.astart()
    try:
        guest = asyncio.ensure_future(asyncio.to_thread(run_inside, tmp_path, server, "restart"))
        # well into swapping: the hog has written more than the guest's RAM
        await console_shows(tmp_path, rf"^HOG wrote {MEMORY_MB * 5 // 4 // 64 * 64} MiB", guest)
        server.kill9()
        await asyncio.sleep(1.0)
        await server.astart()
        result = await guest
    finally:
        server.stop_quietly()
    report = check_inside(result, server.log, warnings="server unreachable|re-attached area")
    assert "re-attached area 'restart'" in result.console, explain(result, server.log)
    walltimes.record(SECTION, "netswap nbd inside, server killed and restarted", result, note(report))
