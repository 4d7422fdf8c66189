"""A netswap server and an NBD frontend in this process, and real NBD tools against them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from netswap.client.fleet import Fleet
from netswap.client.nbd import protocol as p
from netswap.client.nbd.serve import NbdOptions, NbdServer, attach
from tests.helpers import TOKENS, Running, running_server

TOOLS = ("nbdinfo", "nbdcopy", "qemu-io", "fio", "nbdkit", "qemu-system-x86_64")


def require_tools() -> None:
    """`make test` installs these (Debian packages); a missing one is a set-up bug, not a skip."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing NBD test tools {missing}: run `make test` (it installs them)")


@dataclasses.dataclass
class Export:
    server: NbdServer
    socket: Path
    fleet: Fleet

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"


@contextlib.asynccontextmanager
async def nbd_export(
    address: str, socket: Path, name: str = "vm1", size: int = 64 << 20, **opts: Any
) -> AsyncIterator[Export]:
    """`netswap nbd` in this process; `address` may name several servers (A,B,C), as --server does."""
    require_tools()
    options = NbdOptions(
        name=name, size=size, socket=socket, **{k: v for k, v in opts.items() if k != "rpc_timeout"}
    )
    timeout = options.failover_timeout if options.replicas > 1 else opts.get("rpc_timeout", 10.0)
    fleet = await Fleet.connect(address, TOKENS["alice"], timeout=timeout)
    area = await attach(fleet, options)
    server = NbdServer(area, options)
    await server.start()
    try:
        yield Export(server, socket, fleet)
    finally:
        await server.stop()
        area.detach()
        await fleet.close()


@contextlib.asynccontextmanager
async def server_and_export(
    tmp_path: Path, store: str = "file", **opts: Any
) -> AsyncIterator[tuple[Running, Export]]:
    async with (
        running_server(tmp_path, store, capacity=1 << 30, max_area_size=1 << 30) as srv,
        nbd_export(srv.address, tmp_path / "nbd.sock", **opts) as export,
    ):
        yield srv, export


def finished(op: Callable[..., None], *args: Any) -> asyncio.Future[None]:
    """A device operation, op(*args, done), as a future that its done(error) settles."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    op(*args, done)
    return future


async def run(*argv: str, timeout: float = 300, cwd: Path | None = None) -> str:
    """Run a tool without blocking the event loop (the servers live on it); fail loudly."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}:\n{text}")
    return text


class RawClient:
    """A hand-driven NBD client, for requests no polite client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, socket: Path) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(str(socket))
        return cls(reader, writer)

    async def greeting(self) -> int:
        magic, opt, flags = p.GREETING.unpack(await self.reader.readexactly(p.GREETING.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        return int(flags)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect replies up to the final one (ACK or an error)."""
        self.send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply, length = p.OPTION_REPLY.unpack(
                await self.reader.readexactly(p.OPTION_REPLY.size)
            )
            assert magic == p.REPLY_MAGIC and opt == option
            replies.append((reply, await self.reader.readexactly(length)))
            if reply not in (p.REP_INFO, p.REP_SERVER):
                return replies

    async def handshake(self, name: str = "") -> None:
        """Fixed newstyle + NO_ZEROES, then GO."""
        await self.greeting()
        self.send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        raw = name.encode()
        replies = await self.option(p.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert replies[-1][0] == p.REP_ACK, replies

    def request(
        self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> None:
        self.send(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(await self.reader.readexactly(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        data = await self.reader.readexactly(read_length) if error == 0 and read_length else b""
        return int(error), int(cookie), data

    async def closed_by_server(self) -> bool:
        """True once the server has hung up (and the socket is closed here too)."""
        try:
            closed = await asyncio.wait_for(self.reader.read(1), 10) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        await self.close()
        return closed

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
