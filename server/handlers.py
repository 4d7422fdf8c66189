"""The gRPC adapter: bytes in, Gate, decode, manager or PagePath, bytes out. Nothing else.

Every call has one shape -- admit (authenticate, count), read its body, decode
it within bounds, call the core, time it and map a failure to its status
(PagePath.ok / failed). The order matters for hostile callers: gRPC's
interceptors and deserializers run only after a unary call's body has been
received and parsed, so every method is registered as a stream-input handler
with raw bytes, and the Gate decides before a byte of the body is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from netswap.common.limits import PAGE_SIZE
from netswap.common.pagewire import CONTROL, Bounds, Op, decode_small, decode_swap_out, encode_swap_in_reply
from netswap.server.areas import AreaManager
from netswap.server.audit import AuditLog
from netswap.server.errors import InvalidArgument, TimedOut
from netswap.server.gate import Context, Gate
from netswap.server.pagestream import PageStreams
from netswap.server.requests import PagePath, decoded
from netswap.v1 import swap_pb2

Handler = Callable[[str, bytes], Awaitable[bytes]]


class SwapService:
    def __init__(
        self,
        manager: AreaManager,
        gate: Gate,
        path: PagePath,
        audit: AuditLog,
        *,
        request_timeout: float,
    ) -> None:
        self._manager = manager
        self._gate = gate
        self._path = path
        self._audit = audit
        self._request_timeout = request_timeout
        self._bounds = Bounds.for_batches(manager.max_batch_pages)
        self._streams = PageStreams(manager, gate, path, self._bounds)

    def register(self, server: grpc.aio.Server) -> None:
        """Add SwapService to `server`: raw bytes both ways, every method taking a request stream."""
        unary: dict[str, Handler] = {
            "SwapOn": self._swap_on,
            "SwapOut": self._swap_out,
            "SwapIn": self._swap_in,
            "Discard": self._discard,
            "SwapOff": self._swap_off,
            "ListAreas": self._list_areas,
        }
        handlers = {
            name: grpc.stream_unary_rpc_method_handler(self._call(name, h)) for name, h in unary.items()
        }
        handlers["PageStream"] = grpc.stream_stream_rpc_method_handler(self._streams.serve)
        service = swap_pb2.DESCRIPTOR.services_by_name["SwapService"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    def _call(
        self, method: str, handle: Handler
    ) -> Callable[[AsyncIterator[bytes], Context], Awaitable[bytes]]:
        gate, path = self._gate, self._path

        async def call(requests: AsyncIterator[bytes], context: Context) -> bytes:
            start = time.perf_counter()
            try:
                principal, release = gate.admit(method, context)
                try:
                    reply = await handle(principal, await self._body(method, requests))
                finally:
                    release()
            except asyncio.CancelledError:
                path.cancelled(method, start)
                raise
            except Exception as e:
                refusal = path.failed(method, start, e)
            else:
                path.ok(method, start)
                return reply
            return refused(context, refusal)

        return call

    async def _body(self, method: str, requests: AsyncIterator[bytes]) -> bytes:
        """The call's one request message, once all of it has arrived (within request_timeout)."""
        reader = aiter(requests)  # gRPC's receiver hands out its generator
        try:
            async with asyncio.timeout(self._request_timeout):
                raw = await anext(reader, None)
        except TimeoutError:
            raise TimedOut(
                f"the {method} request did not arrive within {self._request_timeout:g}s of its headers"
            ) from None
        finally:
            # gRPC's reader is a generator left holding the message it yielded until
            # closed; closed now, the message goes with the call, not with the next GC.
            aclose = getattr(reader, "aclose", None)
            if aclose is not None:
                await aclose()
        if raw is None:
            raise InvalidArgument(f"no {method} request message")
        return raw

    async def _swap_on(self, principal: str, raw: bytes) -> bytes:
        request = self._control("SwapOn", principal, swap_pb2.SwapOnRequest, raw)
        att = await self._manager.swapon(principal, request.name, request.size_bytes)
        return swap_pb2.SwapOnResponse(
            handle=att.handle,
            slot_count=att.slot_count,
            page_size=PAGE_SIZE,
            created=att.created,
            max_batch_pages=self._manager.max_batch_pages,
            server_id=self._manager.server_id,
            takes_runs=True,
            takes_same_pages=True,
        ).SerializeToString()

    async def _swap_off(self, principal: str, raw: bytes) -> bytes:
        request = self._control("SwapOff", principal, swap_pb2.SwapOffRequest, raw)
        await self._manager.swapoff(principal, request.handle)
        return b""  # SwapOffResponse{}

    async def _list_areas(self, principal: str, raw: bytes) -> bytes:
        self._control("ListAreas", principal, swap_pb2.ListAreasRequest, raw)
        return swap_pb2.ListAreasResponse(
            areas=[
                swap_pb2.AreaInfo(name=a.name, size_bytes=a.size_bytes, pages_stored=a.pages_stored)
                for a in self._manager.list_areas(principal)
            ],
            server_id=self._manager.server_id,
            principal=principal,
        ).SerializeToString()

    def _control(self, method: str, principal: str, message: Any, raw: bytes) -> Any:
        try:
            return decoded(method, lambda b: decode_small(message, b, CONTROL), raw)
        except InvalidArgument:
            if method in ("SwapOn", "SwapOff"):
                self._audit.event(method.lower(), principal=principal, outcome="malformed request")
            raise

    async def _swap_out(self, principal: str, raw: bytes) -> bytes:
        head, pages = decoded("SwapOut", lambda b: decode_swap_out(b, self._bounds), raw)
        await self._path.execute(principal, Op.SWAP_OUT, head, pages)
        return b""  # SwapOutResponse{}

    async def _swap_in(self, principal: str, raw: bytes) -> bytes:
        head = decoded("SwapIn", lambda b: decode_small(swap_pb2.SwapInRequest, b, self._bounds), raw)
        # A serialized SwapInResponse: the pages' only copy.
        return encode_swap_in_reply(*await self._path.execute(principal, Op.SWAP_IN, head, _NO_PAGES))

    async def _discard(self, principal: str, raw: bytes) -> bytes:
        head = decoded("Discard", lambda b: decode_small(swap_pb2.DiscardRequest, b, self._bounds), raw)
        await self._path.execute(principal, Op.DISCARD, head, _NO_PAGES)
        return b""  # DiscardResponse{}


_NO_PAGES = memoryview(b"")


def refused(context: Context, status: tuple[grpc.StatusCode, str]) -> bytes:
    """End a call with `status` (gRPC sends no reply message with a status that is not OK).

    Not context.abort(): its exception and the call's state form a reference
    cycle per call, which keeps every refused call's memory until the garbage
    collector happens to run -- under a flood of bad calls, hundreds of MiB."""
    context.set_code(status[0])
    context.set_details(status[1])
    return b""
