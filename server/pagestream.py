"""PageStream: SwapOut, SwapIn and Discard as messages on one long-lived call.

A unary call costs gRPC a stream, headers and several trips through its
completion queue; a message on an open stream costs a fraction of that (see
README, Performance). Each message here means exactly what the unary method
of the same name means: the same AreaManager call, checks and metrics (a
SwapOut is timed to its answer; the memory store copies its pages after that,
see serve). A failed request is answered in-band -- its status code and
message in its PageReply -- so one bad request does not tear down the stream
other requests share. Requests are answered one at a time, in order: the
store works on the event loop anyway, and the caller pipelines to keep the
pipe full.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import grpc

from netswap.common.pagewire import PageOp, encode_page_error, encode_page_reply
from netswap.server.areas import AreaManager, slots_of
from netswap.server.errors import InvalidArgument
from netswap.server.interceptors import Malformed
from netswap.server.metrics import TITLES, ServerMetrics
from netswap.server.status import status_for

_DONE = encode_page_reply()  # the reply of every SwapOut and Discard that succeeded


class PageStreams:
    def __init__(self, manager: AreaManager, metrics: ServerMetrics) -> None:
        self._manager = manager
        self._metrics = metrics
        # The series a request that succeeded updates, looked up once:
        # (its time, its pages).
        self._ok = {
            op: (metrics.rpc_duration.labels(op, grpc.StatusCode.OK.name), metrics.batch_pages[method])
            for method, op in TITLES.items()
        }

    async def serve(
        self, principal: str, requests: AsyncIterator[PageOp | Malformed]
    ) -> AsyncGenerator[bytes, None]:
        # A SwapOut is answered once checked; the memory store copies its
        # pages here, once gRPC has sent the reply and before this stream's
        # next request is read (or sooner, when another call touches the
        # area: Backing.write). The copy leaves the round trip: a 64-page
        # SwapOut's p50 297 -> 272 us (README, Performance).
        manager = self._manager
        try:
            async for request in requests:
                yield self.answer(principal, request)
                manager.settle()
        finally:  # the stream ends or is cancelled with a copy pending
            manager.settle()

    def answer(self, principal: str, request: PageOp | Malformed) -> bytes:
        """One request's serialized PageReply. A SwapOut's copy may be left to the
        manager's settle(), which serve() calls once the reply is sent."""
        # Every request passes here: one frame for the common path, which a
        # cold cache makes cost a few us per step (README, Performance).
        start = time.perf_counter()
        op = "PageStream"
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.message)
            op, head, pages = request
            count = head.run_count
            if count and not head.slots:  # a run, as most requests are: slots_of's range, inline
                slots: Sequence[int] = range(head.run_start, head.run_start + count)
            else:
                slots = slots_of(head.slots, head.run_start, count)
            if op == "SwapOut":
                # `pages` is a view of this request's bytes, which nobody changes
                self._manager.swap_out(principal, head.handle, slots, pages, later=True)
                reply = _DONE
            elif op == "SwapIn":
                reply = encode_page_reply(self._manager.swap_in(principal, head.handle, slots))
            else:
                self._manager.discard(principal, head.handle, slots)
                reply = _DONE
        except Exception as e:
            code, message = status_for(e, f"{op} on PageStream")
            self._metrics.rpc_duration.labels(op, code.name).observe(time.perf_counter() - start)
            return encode_page_error(code.value[0], message)
        took, moved = self._ok[op]
        took.observe(time.perf_counter() - start)
        moved.observe(len(slots))
        return reply
