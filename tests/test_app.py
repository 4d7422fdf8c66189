"""What build_server assembles besides SwapService: reflection and health."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import Running


async def test_reflection_lists_the_services(srv: Running) -> None:
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"netswap.v1.SwapService", "grpc.health.v1.Health"} <= names
