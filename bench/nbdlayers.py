# ruff: noqa: E402  (gRPC may load only after grpcenv.apply())
"""Two NBD servers that take layers away from netswap's block path, for bench/block.py.

    .venv/bin/python bench/nbdlayers.py floor SOCKET      # a bare Python NBD server
    .venv/bin/python bench/nbdlayers.py frontend SOCKET   # `netswap nbd` without gRPC
    NETSWAP_SERVER=unix:G NETSWAP_TOKEN=T \
    .venv/bin/python bench/nbdlayers.py relay SOCKET      # floor + one PageStream message each

floor: the least a Python NBD server can do on netswap's event loop (uvloop):
parse each request, copy the payload into or out of one bytearray, answer
-- replies of one socket read leave in one writev, as netswap's do. No
checks, no pool, no batching, no RPC. What it reaches is the ceiling of any
Python frontend on this machine.

frontend: netswap's own NBD frontend (NbdServer: connection, device, page
pool, range locks, batching, metrics) on an area that lives in this process
and copies pages in and out of a bytearray instead of sending RPCs. The gap
to `floor` is the frontend's own work; the gap from here to netswap is the
gRPC transport and the server.

relay: `floor` that forwards each READ and WRITE, as it comes, as one
PageStream message to a server (a netswap-server, or bench/library.py's
echo), and answers when the reply comes: no pool, no batching, no checks,
no retries, no metrics. At queue depth 1 it is the least a Python frontend
over that server and transport does for a request.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from netswap.common import grpcenv

grpcenv.apply()

import grpc

from netswap.client.nbd import protocol as p
from netswap.client.nbd.serve import NbdOptions, NbdServer
from netswap.client.pool import PagePool
from netswap.common import loop
from netswap.common.heap import keep_heap
from netswap.common.limits import PAGE_SIZE
from netswap.v1 import swap_pb2 as pb

SIZE = 512 << 20
MAX_BATCH = 256  # netswap-server's default max_batch_pages


class FloorConnection(asyncio.BufferedProtocol):
    """Handshake (NBD_OPT_GO or EXPORT_NAME), then READ, WRITE, FLUSH and DISC on `store`."""

    EXPORT = p.Export("", "floor", SIZE, p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH, 1, PAGE_SIZE, 32 << 20)

    def __init__(self, store: memoryview) -> None:
        self.store = store
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.phase = "flags"
        self.sink: memoryview | None = None  # a write payload arriving straight into the store
        self.sink_reply = b""
        self.out: list[bytes | memoryview] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(p.greeting())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.sink is not None:
            return self.sink
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end > len(self.buf) - (64 << 10):
            n = self.end - self.start
            self.view[:n] = self.view[self.start : self.end]
            self.start, self.end = 0, n
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.sink is not None:
            self.sink = self.sink[nbytes:]
            if len(self.sink):
                return
            self.sink = None
            self.payload_arrived()
        else:
            self.end += nbytes
        self.parse()
        if self.out:
            self.transport.writelines(self.out)
            self.out = []

    def payload_arrived(self) -> None:
        """A write's payload, split over socket reads, is all in: answer it."""
        self.out.append(self.sink_reply)

    def parse(self) -> None:
        buf, out, store = self.buf, self.out, self.store
        while True:
            available = self.end - self.start
            if self.phase == "flags":
                if available < p.CLIENT_FLAGS.size:
                    return
                self.start += p.CLIENT_FLAGS.size
                self.phase = "options"
            elif self.phase == "options":
                if available < p.OPTION_HEADER.size:
                    return
                _, option, length = p.OPTION_HEADER.unpack_from(buf, self.start)
                if available < p.OPTION_HEADER.size + length:
                    return
                self.start += p.OPTION_HEADER.size + length
                if option == p.OPT_GO:
                    self.transport.writelines(p.info_replies(option, self.EXPORT, []))
                    self.phase = "transmission"
                elif option == p.OPT_EXPORT_NAME:
                    self.transport.write(p.export_name_reply(self.EXPORT, True))
                    self.phase = "transmission"
                else:
                    self.transport.write(p.error_reply(option, p.REP_ERR_UNSUP, "not in the floor server"))
            else:
                if available < p.REQUEST.size:
                    return
                _, _, cmd, cookie, offset, length = p.REQUEST.unpack_from(buf, self.start)
                self.start += p.REQUEST.size
                reply = p.simple_reply(0, cookie)
                if cmd == p.CMD_READ:
                    out.append(reply)
                    out.append(store[offset : offset + length])
                elif cmd == p.CMD_WRITE:
                    have = min(length, self.end - self.start)
                    store[offset : offset + have] = self.view[self.start : self.start + have]
                    self.start += have
                    if have < length:
                        self.sink = store[offset + have : offset + length]
                        self.sink_reply = reply
                        return
                    out.append(reply)
                elif cmd == p.CMD_DISC:
                    self.transport.close()
                    return
                else:
                    out.append(reply)


class RelayConnection(FloorConnection):
    """FloorConnection's handshake; then each READ and WRITE is one message on `call`
    (a PageStream), answered in order as the replies come."""

    def __init__(self, call: Any, handle: bytes) -> None:
        super().__init__(memoryview(bytearray(0)))
        self.call, self.handle = call, handle
        self.requests: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting: deque[tuple[int, bool]] = deque()  # (cookie, is a read), in request order
        self.write_cookie, self.write_offset, self.write_data = 0, 0, bytearray()
        self.tasks: list[asyncio.Task[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.tasks = [asyncio.ensure_future(self.send()), asyncio.ensure_future(self.receive())]

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()
        self.call.cancel()

    async def send(self) -> None:
        while True:
            await self.call.write(await self.requests.get())

    async def receive(self) -> None:
        while True:
            reply = pb.PageReply.FromString(await self.call.read())
            cookie, is_read = self.waiting.popleft()
            if is_read:
                self.transport.writelines(
                    (p.simple_reply(0 if not reply.code else p.EIO, cookie), reply.pages)
                )
            else:
                self.transport.write(p.simple_reply(0 if not reply.code else p.EIO, cookie))

    def payload_arrived(self) -> None:
        self.forward_write(self.write_cookie, self.write_offset, self.write_data)

    def forward_write(self, cookie: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.waiting.append((cookie, False))
        first, count = offset // PAGE_SIZE, len(data) // PAGE_SIZE
        swap_out = pb.SwapOutRequest(handle=self.handle, run_start=first, run_count=count, pages=bytes(data))
        self.requests.put_nowait(pb.PageRequest(swap_out=swap_out).SerializeToString())

    def parse(self) -> None:
        if self.phase != "transmission":
            super().parse()
        while self.phase == "transmission" and self.end - self.start >= p.REQUEST.size:
            _, _, cmd, cookie, offset, length = p.REQUEST.unpack_from(self.buf, self.start)
            self.start += p.REQUEST.size
            if cmd == p.CMD_READ:
                self.waiting.append((cookie, True))
                swap_in = pb.SwapInRequest(
                    handle=self.handle, run_start=offset // PAGE_SIZE, run_count=length // PAGE_SIZE
                )
                self.requests.put_nowait(pb.PageRequest(swap_in=swap_in).SerializeToString())
            elif cmd == p.CMD_WRITE:
                have = min(length, self.end - self.start)
                if have == length:
                    self.forward_write(cookie, offset, self.view[self.start : self.start + length])
                    self.start += length
                else:  # the rest of the payload arrives straight into a buffer of its own
                    self.write_cookie, self.write_offset = cookie, offset
                    self.write_data = bytearray(length)
                    self.write_data[:have] = self.view[self.start : self.start + have]
                    self.start += have
                    self.sink = memoryview(self.write_data)[have:]
                    return
            elif cmd == p.CMD_DISC:
                self.transport.close()
                return
            else:
                self.out.append(p.simple_reply(0, cookie))


async def relay_to(address: str, token: str) -> tuple[Any, bytes]:
    """A PageStream opener on `address`, and the handle of a SIZE area there (an echo has no
    SwapOn and takes any handle)."""
    metadata = (("authorization", f"Bearer {token}"),)
    channel = grpc.aio.insecure_channel(address)
    swapon = channel.unary_unary(
        "/netswap.v1.SwapService/SwapOn",
        request_serializer=pb.SwapOnRequest.SerializeToString,
        response_deserializer=pb.SwapOnResponse.FromString,
    )
    try:
        handle: bytes = (
            await swapon(pb.SwapOnRequest(name="relay", size_bytes=SIZE), metadata=metadata)
        ).handle
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        handle = b"echo"
    stream = channel.stream_stream(
        "/netswap.v1.SwapService/PageStream", request_serializer=None, response_deserializer=None
    )
    return lambda: stream(None, metadata=metadata), handle


class MemoryArea:
    """The RPC side of an area (client.nbd.device.BatchArea) in this process: pages are copied
    into and out of a bytearray where netswap would send SwapOut and SwapIn."""

    def __init__(self) -> None:
        self.name = "layers"
        self.page_size = PAGE_SIZE
        self.size_bytes = SIZE
        self.max_batch_pages = MAX_BATCH
        self.pool = PagePool(2048)  # NbdOptions' default pool_pages
        self._store = memoryview(bytearray(SIZE))

    async def write_batch(self, slots: Sequence[int], pages: Sequence[memoryview]) -> None:
        blob = b"".join(pages)  # as the RPC encoder's one copy
        ps = self.page_size
        for i, slot in enumerate(slots):
            self._store[slot * ps : (slot + 1) * ps] = blob[i * ps : (i + 1) * ps]

    async def read_batch(self, slots: Sequence[int], into: Sequence[memoryview]) -> None:
        ps = self.page_size
        blob = b"".join([self._store[s * ps : (s + 1) * ps] for s in slots])  # as the reply's one copy
        pos = 0
        for view in into:
            view[:] = blob[pos : pos + len(view)]
            pos += len(view)

    async def discard_batch(self, slots: Sequence[int]) -> None:
        ps = self.page_size
        for slot in slots:
            self._store[slot * ps : (slot + 1) * ps] = bytes(ps)

    async def reattach(self) -> bool:
        return False

    async def superseded(self) -> bool:
        return False


async def serve(kind: str, socket: Path) -> None:
    running = asyncio.get_running_loop()
    if kind == "floor":
        store = memoryview(bytearray(SIZE))
        await running.create_unix_server(lambda: FloorConnection(store), str(socket))
    elif kind == "relay":
        open_call, handle = await relay_to(os.environ["NETSWAP_SERVER"], os.environ.get("NETSWAP_TOKEN", ""))
        await running.create_unix_server(lambda: RelayConnection(open_call(), handle), str(socket))
    else:
        area = MemoryArea()
        # NbdServer is typed for netswap's Area; it uses only the BatchArea part of it.
        await NbdServer(
            cast(Any, area), NbdOptions(name=area.name, size=SIZE, socket=socket, mlock=False)
        ).start()
    await asyncio.Event().wait()


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("floor", "frontend", "relay"):
        print(__doc__, file=sys.stderr)
        return 2
    keep_heap()  # as netswap's processes do
    loop.run(lambda: serve(sys.argv[1], Path(sys.argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
