"""Reserve safety: the frontend is locked, its memory stays flat, and it keeps serving at a memory limit."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from netswap.client.reserve import MIN_FREE_KBYTES, check_min_free
from netswap.v1 import swap_pb2
from tests.frontend import Frontend, MemoryCgroup, MiB, explain_death, fence, hogs_at_the_limit
from tests.helpers import PS, ServerProcess, auth, running_server, stub_for
from tests.nbdenv import require_tools, run


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    require_tools()
    proc = ServerProcess(tmp_path, tmp_path / "store", "--capacity", "4GiB", "--max-area-size", "4GiB")
    await proc.astart()
    yield proc
    proc.stop_quietly()


def thread_policy(task: Path) -> int:
    """The scheduling policy of one thread (/proc/PID/task/TID/stat field 41)."""
    fields = task.joinpath("stat").read_text().rpartition(") ")[2].split()
    return int(fields[38])


async def test_nbd_locks_itself_and_reports_it(tmp_path: Path, server: ServerProcess) -> None:
    nbd = Frontend(tmp_path, server.address, "vm1", "64MiB")
    await nbd.start()
    try:
        line = next(li for li in nbd.log.read_text().splitlines() if "netswap nbd: serving" in li)
        assert "mlockall on" in line
        locked = nbd.status("VmLck")
        assert locked >= 8 * MiB  # at least the page pool
        # (serving a scrape maps a little more, so compare loosely)
        assert abs(nbd.metric("netswap_client_memory_locked_bytes") - locked) < 4 * MiB
        assert nbd.metric("netswap_client_pool_pages") == 2048
        flusher = nbd.metric("netswap_client_io_flusher")
        assert ("IO_FLUSHER set" in line) == (flusher == 1)
        # Per-thread, so set before gRPC started its threads: every thread has it
        # (this sandbox grants CAP_SYS_NICE; IO_FLUSHER's CAP_SYS_RESOURCE it does not:
        # tests/guest/test_inside_vm.py checks that one, as root in a guest).
        assert "SCHED_FIFO on" in line
        policies = {tid.name: thread_policy(tid) for tid in Path(f"/proc/{nbd.pid}/task").iterdir()}
        assert len(policies) > 1 and set(policies.values()) == {os.SCHED_FIFO}, policies
        # threads start with 1 MiB stacks, so locking them all stays cheap
        limits = Path(f"/proc/{nbd.pid}/limits").read_text()
        assert re.search(r"Max stack size\s+1048576\s", limits), limits
        out = await run("qemu-io", "-f", "raw", nbd.uri, "-c", "write -P 9 0 1M", "-c", "read -P 9 0 1M")
        assert "Pattern verification failed" not in out
    finally:
        assert await nbd.stop() == 0


async def test_refused_mlock_is_a_clear_error(tmp_path: Path, server: ServerProcess) -> None:
    nbd = Frontend(tmp_path, server.address, "vm1", "64MiB")
    # Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, mlockall must fail.
    argv = [
        "setpriv",
        "--bounding-set=-ipc_lock",
        "--inh-caps=-ipc_lock",
        "prlimit",
        "--memlock=65536",
        *nbd.argv,
    ]
    out = subprocess.run(argv, env=nbd.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "mlockall failed" in out.stderr and "RLIMIT_MEMLOCK is 64 KiB" in out.stderr
    assert "--no-mlock" in out.stderr
    # opting out works under the same limits
    argv = [*argv, "--no-mlock"]
    with subprocess.Popen(
        argv, env=nbd.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            while "netswap nbd: serving" not in line:
                assert line, "netswap nbd --no-mlock did not start"
                line = proc.stdout.readline()
            assert "mlockall off" in line
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def test_memory_stays_flat_while_2_gib_go_through(tmp_path: Path, server: ServerProcess) -> None:
    nbd = Frontend(tmp_path, server.address, "vm1", "1GiB")
    await nbd.start()
    try:
        fio = ["fio", "--ioengine=nbd", f"--uri={nbd.uri}", "--iodepth=32", "--bsrange=4k-128k"]
        await run(*fio, "--name=warmup", "--rw=randwrite", "--io_size=100M", "--size=1G", cwd=tmp_path)
        warm = nbd.status("VmHWM")
        await run(*fio, "--name=bulk", "--rw=randrw", "--io_size=2G", "--size=1G", cwd=tmp_path, timeout=600)
        peak = nbd.status("VmHWM")
    finally:
        assert await nbd.stop() == 0
    assert peak - warm < 8 * MiB, f"peak RSS grew by {(peak - warm) / MiB:.1f} MiB over 2 GiB"


async def test_keeps_serving_inside_a_memory_limit_next_to_a_hog(
    tmp_path: Path, server: ServerProcess
) -> None:
    """The frontend shares a memory cgroup, limited to its own footprint plus a margin, with
    processes that allocate until the limit is reached -- one after another, for the whole
    fio verify run. The OOM killer must take the hogs, never the frontend, and fio must see
    no error."""
    cgroup = MemoryCgroup()
    # SCHED_FIFO off: a memory cgroup's limit gives a realtime task no reserve, and a busy
    # realtime frontend slows the replacement of OOM-killed hogs, leaving it the only victim.
    nbd = Frontend(tmp_path, server.address, "vm1", "256MiB", "--no-realtime")
    try:
        await nbd.start(cgroup)
        assert "SCHED_FIFO off" in nbd.log.read_text()
        argv = ["fio", "--name=limited", "--ioengine=nbd", f"--uri={nbd.uri}", "--rw=randwrite"]
        argv += ["--bs=4k", "--iodepth=32", "--size=128M", "--io_size=256M"]
        argv += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]
        # Warm up every path (write, read, RMW, discard, verify) -- with the
        # very workload that follows, twice: gRPC's buffers and the heap take
        # ~0.5 GiB of traffic to settle -- then fence it in.
        for _ in range(2):
            await run(*argv, cwd=tmp_path)
        await run("qemu-io", "-f", "raw", nbd.uri, "-c", "write -P 2 1000 9000", "-c", "discard 8M 1M")
        fence(cgroup, nbd)  # its docstring has the arithmetic of the margin
        rss_before = nbd.status("VmRSS")
        async with hogs_at_the_limit(cgroup):
            try:
                out = await run(*argv, cwd=tmp_path, timeout=300)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{explain_death(nbd)}") from e
        assert nbd.alive(), explain_death(nbd)
        assert "err= 0" in out, out
        assert cgroup.oom_kills >= 1 and cgroup.failcnt > 0, "the limit was never reached"
        # flat: 65k more requests, and the footprint moves by less than the
        # 8 MiB page pool it works from (bench/memory.py: < 1 MiB over 2 GiB)
        assert nbd.status("VmRSS") - rss_before < 2 * MiB
    finally:
        if nbd.proc is not None:
            await nbd.stop()
        cgroup.remove()


@pytest.mark.parametrize("size", [8 * MiB])
async def test_server_mlock_refuses_swapon_it_cannot_lock(tmp_path: Path, size: int) -> None:
    # In-process first: as root, locking works and the area is resident.
    async with running_server(tmp_path, "memory", mlock=True) as srv, stub_for(srv.address) as stub:
        reply = await stub.SwapOn(swap_pb2.SwapOnRequest(name="a", size_bytes=size), metadata=auth("alice"))
        assert reply.created
    # As a process that may lock only 1 MiB: SwapOn is refused, nothing is reserved.
    home = tmp_path / "limited"
    home.mkdir()
    server = ServerProcess(home, home / "store", "--store", "memory", "--mlock")
    drop = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "prlimit", f"--memlock={MiB}"]
    server.argv = [*drop, *server.argv]
    await server.astart()
    try:
        async with stub_for(server.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SwapOn(swap_pb2.SwapOnRequest(name="big", size_bytes=size), metadata=auth("alice"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "cannot lock" in (err.value.details() or "")
            listed = await stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth("alice"))
            assert list(listed.areas) == []
            small = await stub.SwapOn(
                swap_pb2.SwapOnRequest(name="small", size_bytes=64 * PS), metadata=auth("alice")
            )
            assert small.created
    finally:
        server.stop_quietly()


async def test_memory_store_discard_keeps_the_reservation(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, "memory", capacity=4 * MiB, max_area_size=4 * MiB) as srv,
        stub_for(srv.address) as stub,
    ):
        a = await stub.SwapOn(swap_pb2.SwapOnRequest(name="a", size_bytes=4 * MiB), metadata=auth("alice"))
        pages = bytes([7]) * (256 * PS)
        await stub.SwapOut(
            swap_pb2.SwapOutRequest(handle=a.handle, slots=range(256), pages=pages),
            metadata=auth("alice"),
        )
        await stub.Discard(swap_pb2.DiscardRequest(handle=a.handle, slots=range(256)), metadata=auth("alice"))
        # the capacity is still all taken: discard gave nothing back
        assert srv.server.manager.reserved_bytes == 4 * MiB
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SwapOn(swap_pb2.SwapOnRequest(name="b", size_bytes=PS), metadata=auth("bob"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # and the discarded slots take writes again
        await stub.SwapOut(
            swap_pb2.SwapOutRequest(handle=a.handle, slots=range(256), pages=pages),
            metadata=auth("alice"),
        )
        got = await stub.SwapIn(
            swap_pb2.SwapInRequest(handle=a.handle, slots=[0, 255]), metadata=auth("alice")
        )
        assert got.pages == pages[: 2 * PS]


def test_low_min_free_kbytes_is_named(tmp_path: Path) -> None:
    sysctl = tmp_path / "min_free_kbytes"
    sysctl.write_text("1850\n")
    note = check_min_free(sysctl)
    assert note is not None and "vm.min_free_kbytes is 1850" in note and "90-netswap.conf" in note
    sysctl.write_text(f"{MIN_FREE_KBYTES}\n")
    assert check_min_free(sysctl) is None
    # the file the docs install sets at least that much
    conf = Path(__file__).parents[2] / "deploy" / "vm" / "90-netswap.conf"
    lines = [ln for ln in conf.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    values = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in lines)}
    assert int(values["vm.min_free_kbytes"]) >= MIN_FREE_KBYTES
