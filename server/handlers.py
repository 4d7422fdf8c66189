"""The gRPC adapter: protobuf in, AreaManager call, protobuf out. Nothing else.

Every handler has one shape -- read the request, call the manager, count, reply.
Authentication, error -> status mapping and timing happen in the interceptors;
validation happens in the manager.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from netswap.common.limits import PAGE_SIZE
from netswap.common.pagewire import PageOp, decode_page_request, decode_swap_out, encode_swap_in_reply
from netswap.server.areas import AreaManager, slots_of
from netswap.server.auth import current_principal
from netswap.server.interceptors import Context, Malformed
from netswap.server.metrics import ServerMetrics
from netswap.server.pagestream import PageStreams
from netswap.v1 import swap_pb2


class SwapServicer:
    def __init__(self, manager: AreaManager, metrics: ServerMetrics) -> None:
        self._manager = manager
        self._metrics = metrics
        self._streams = PageStreams(manager, metrics)

    async def SwapOn(self, request: swap_pb2.SwapOnRequest, context: Context) -> swap_pb2.SwapOnResponse:
        att = await self._manager.swapon(current_principal(), request.name, request.size_bytes)
        return swap_pb2.SwapOnResponse(
            handle=att.handle,
            slot_count=att.slot_count,
            page_size=PAGE_SIZE,
            created=att.created,
            max_batch_pages=self._manager.max_batch_pages,
            server_id=self._manager.server_id,
            takes_runs=True,
        )

    async def SwapOut(
        self, request: tuple[swap_pb2.SwapOutRequest, memoryview], context: Context
    ) -> swap_pb2.SwapOutResponse:
        head, pages = request  # see register(): the blob stays a view of the received bytes
        slots = slots_of(head.slots, head.run_start, head.run_count)
        self._manager.swap_out(current_principal(), head.handle, slots, pages)
        self._metrics.pages_moved("swap_out", len(slots))
        return swap_pb2.SwapOutResponse()

    async def SwapIn(self, request: swap_pb2.SwapInRequest, context: Context) -> bytes:
        slots = slots_of(request.slots, request.run_start, request.run_count)
        pages = self._manager.swap_in(current_principal(), request.handle, slots)
        self._metrics.pages_moved("swap_in", len(slots))
        return encode_swap_in_reply(pages)  # a serialized SwapInResponse: the pages' only copy

    async def Discard(self, request: swap_pb2.DiscardRequest, context: Context) -> swap_pb2.DiscardResponse:
        slots = slots_of(request.slots, request.run_start, request.run_count)
        self._manager.discard(current_principal(), request.handle, slots)
        self._metrics.pages_moved("discard", len(slots))
        return swap_pb2.DiscardResponse()

    async def SwapOff(self, request: swap_pb2.SwapOffRequest, context: Context) -> swap_pb2.SwapOffResponse:
        await self._manager.swapoff(current_principal(), request.handle)
        return swap_pb2.SwapOffResponse()

    async def ListAreas(
        self, request: swap_pb2.ListAreasRequest, context: Context
    ) -> swap_pb2.ListAreasResponse:
        areas = self._manager.list_areas(current_principal())
        return swap_pb2.ListAreasResponse(
            areas=[
                swap_pb2.AreaInfo(name=a.name, size_bytes=a.size_bytes, pages_stored=a.pages_stored)
                for a in areas
            ],
            server_id=self._manager.server_id,
        )

    def PageStream(
        self, requests: AsyncIterator[PageOp | Malformed], context: Context
    ) -> AsyncIterator[bytes]:
        # The replies themselves, not a generator around them: one layer less
        # for every message (the interceptors call this, never gRPC itself).
        return self._streams.serve(current_principal(), requests)


def register(servicer: SwapServicer, server: grpc.aio.Server) -> None:
    """Add SwapService to `server`: generated (de)serializers, except for the page blobs."""
    v1 = swap_pb2

    def rpc(behavior: Any, parse: Any, serialize: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=parse, response_serializer=serialize
        )

    handlers = {
        "SwapOn": rpc(servicer.SwapOn, v1.SwapOnRequest.FromString, v1.SwapOnResponse.SerializeToString),
        "SwapOut": rpc(servicer.SwapOut, decode_swap_out, v1.SwapOutResponse.SerializeToString),
        # None: the reply is already bytes (pagewire), which gRPC sends as they are.
        "SwapIn": rpc(servicer.SwapIn, v1.SwapInRequest.FromString, None),
        "Discard": rpc(servicer.Discard, v1.DiscardRequest.FromString, v1.DiscardResponse.SerializeToString),
        "SwapOff": rpc(servicer.SwapOff, v1.SwapOffRequest.FromString, v1.SwapOffResponse.SerializeToString),
        "ListAreas": rpc(
            servicer.ListAreas, v1.ListAreasRequest.FromString, v1.ListAreasResponse.SerializeToString
        ),
        "PageStream": grpc.stream_stream_rpc_method_handler(
            servicer.PageStream,
            request_deserializer=decode_page_request,
            response_serializer=None,  # as SwapIn's
        ),
    }
    service = swap_pb2.DESCRIPTOR.services_by_name["SwapService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
