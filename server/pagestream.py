"""PageStream: SwapOut, SwapIn and Discard as messages on one long-lived call.

A unary call costs gRPC a stream, headers and several trips through its
completion queue; a message on an open stream costs a fraction of that. Each
message here means exactly what the unary method of the same name means: it
takes the same PagePath. A failed request is answered in-band -- its status
code and message in its PageReply -- so one bad request does not tear down
the stream other requests share. Requests are answered one at a time, in
order: the caller pipelines to keep the pipe full.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from netswap.common.pagewire import Bounds, decode_page_request, encode_page_error, encode_page_reply
from netswap.server.areas import AreaManager
from netswap.server.gate import Context, Gate
from netswap.server.requests import PagePath, malformed
from netswap.server.status import status_for

METHOD = "PageStream"


class PageStreams:
    def __init__(self, manager: AreaManager, gate: Gate, path: PagePath, bounds: Bounds) -> None:
        self._manager = manager
        self._gate = gate
        self._path = path
        self._bounds = bounds

    async def serve(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """The gRPC behaviour: admit the caller, then answer its requests until it stops. A
        coroutine writing its replies itself, so no generator stands between them and gRPC."""
        try:
            principal, release = self._gate.admit(METHOD, context, stream=True)
        except Exception as e:  # refused: the stream ends with the status, and no reply
            _end(context, status_for(e, METHOD))
            return
        try:
            await self.run(principal, requests, context.write, context)
        except Exception as e:
            _end(context, status_for(e, METHOD))
        finally:
            release()

    async def run(
        self,
        principal: str,
        requests: AsyncIterator[bytes],
        send: Callable[[bytes], Awaitable[None]],
        context: Context | None = None,
    ) -> None:
        """Answer each request in order with send(reply). With `context`, the caller is
        authenticated again after every reload of the credentials."""
        manager = self._manager
        credentials = self._gate.credentials
        table = credentials.table
        try:
            async for raw in requests:
                if context is not None and credentials.table is not table:
                    # A reload replaces the table: whoever opened this stream
                    # must still be known, under the same name, before its
                    # next request -- a revoked token stops working at once.
                    table = credentials.table
                    self._gate.still(principal, METHOD, context, table)
                await send(await self.answer(principal, raw))
                # A SwapOut's copy, left for after its reply (AreaManager.swap_out).
                manager.settle()
        finally:  # the stream ends or is cancelled with a copy pending
            manager.settle()

    async def answer(self, principal: str, raw: bytes) -> bytes:
        """One request's serialized PageReply."""
        start = time.perf_counter()
        method = METHOD
        try:
            try:
                op, head, pages = decode_page_request(raw, self._bounds)
                refusal = None
            except (ValueError, DecodeError) as e:
                refusal = malformed("PageRequest", e)
            if refusal is not None:  # not raised: its traceback would keep this frame, and raw
                code, message = self._path.failed(method, start, refusal)
                return encode_page_error(code.value[0], message)
            method = op.value
            pieces, same = await self._path.execute(principal, op, head, pages, later=True)
        except Exception as e:
            code, message = self._path.failed(method, start, e)
            return encode_page_error(code.value[0], message)
        self._path.ok(method, start)
        return encode_page_reply(pieces, same)


def _end(context: Context, status: tuple[grpc.StatusCode, str]) -> None:
    """End the stream with `status` once the behaviour returns (not abort(): see handlers.refused)."""
    context.set_code(status[0])
    context.set_details(status[1])
