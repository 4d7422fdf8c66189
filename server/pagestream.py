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
from collections.abc import AsyncGenerator, AsyncIterator

from netswap.common.pagewire import Bounds, decode_page_request, encode_page_error, encode_page_reply
from netswap.server.areas import AreaManager
from netswap.server.gate import Context, Gate
from netswap.server.requests import PagePath, decoded
from netswap.server.status import status_for

METHOD = "PageStream"


class PageStreams:
    def __init__(self, manager: AreaManager, gate: Gate, path: PagePath, bounds: Bounds) -> None:
        self._manager = manager
        self._gate = gate
        self._path = path
        self._bounds = bounds

    async def serve(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        """The gRPC behaviour: admit the caller, then answer its requests until it stops."""
        try:
            with self._gate.admitted(METHOD, context, stream=True) as principal:
                async for reply in self.replies(principal, requests, context):
                    yield reply
        except Exception as e:
            code, message = status_for(e, METHOD)
            context.set_code(code)  # not abort(): see handlers.refused
            context.set_details(message)

    async def replies(
        self, principal: str, requests: AsyncIterator[bytes], context: Context | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Each request's reply, in order. With `context`, the caller is authenticated again
        after every reload of the credentials."""
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
                yield await self.answer(principal, raw)
                # A SwapOut's copy, left for after its reply (AreaManager.swap_out).
                manager.settle()
        finally:  # the stream ends or is cancelled with a copy pending
            manager.settle()

    async def answer(self, principal: str, raw: bytes) -> bytes:
        """One request's serialized PageReply."""
        start = time.perf_counter()
        method = METHOD
        try:
            op, head, pages = decoded("PageRequest", lambda b: decode_page_request(b, self._bounds), raw)
            method = op.value
            pieces, same = await self._path.execute(principal, op, head, pages, later=True)
        except Exception as e:
            code, message = self._path.failed(method, start, e)
            return encode_page_error(code.value[0], message)
        self._path.ok(method, start)
        return encode_page_reply(pieces, same)
