"""PageStream: SwapOut, SwapIn and Discard as messages on one long-lived call.

A unary call costs gRPC a stream, headers and several trips through its
completion queue; a message on an open stream costs a fraction of that (see
README, Performance). Each message here means exactly what the unary method
of the same name means: the same AreaManager call, checks and metrics. A
failed request is answered in-band -- its status code and message in its
PageReply -- so one bad request does not tear down the stream other requests
share. Requests are answered one at a time, in order: the store works on the
event loop anyway, and the caller pipelines to keep the pipe full.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from netswap.common.pagewire import PageHead, PageOp, encode_page_error, encode_page_reply
from netswap.server.areas import AreaManager
from netswap.server.errors import InvalidArgument
from netswap.server.interceptors import Malformed
from netswap.server.metrics import ServerMetrics
from netswap.server.status import status_for

_METRIC = {"SwapOut": "swap_out", "SwapIn": "swap_in", "Discard": "discard"}
_DONE = encode_page_reply()  # the reply of every SwapOut and Discard that succeeded


class PageStreams:
    def __init__(self, manager: AreaManager, metrics: ServerMetrics) -> None:
        self._manager = manager
        self._metrics = metrics
        # The common outcomes' histogram children, looked up once.
        self._ok = {op: metrics.rpc_duration.labels(op, grpc.StatusCode.OK.name) for op in _METRIC}

    async def serve(
        self, principal: str, requests: AsyncIterator[PageOp | Malformed]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield self.answer(principal, request)

    def answer(self, principal: str, request: PageOp | Malformed) -> bytes:
        """One request's serialized PageReply."""
        start = time.perf_counter()
        op = "PageStream"
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.message)
            op, head, pages = request
            reply = self._apply(principal, op, head, pages)
        except Exception as e:
            code, message = status_for(e, f"{op} on PageStream")
        else:
            self._ok[op].observe(time.perf_counter() - start)
            return reply
        self._metrics.rpc_duration.labels(op, code.name).observe(time.perf_counter() - start)
        return encode_page_error(code.value[0], message)

    def _apply(self, principal: str, op: str, head: PageHead, pages: memoryview) -> bytes:
        manager = self._manager
        if op == "SwapOut":
            manager.swap_out(principal, head.handle, head.slots, pages)
            reply = _DONE
        elif op == "SwapIn":
            reply = encode_page_reply(manager.swap_in(principal, head.handle, head.slots))
        else:
            manager.discard(principal, head.handle, head.slots)
            reply = _DONE
        self._metrics.pages_moved(_METRIC[op], len(head.slots))
        return reply
