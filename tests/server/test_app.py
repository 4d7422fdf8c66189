"""What build_server assembles besides SwapService: the health port, with health and reflection."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from netswap.v1 import swap_pb2, swap_pb2_grpc
from tests.helpers import auth, running_server


async def test_the_health_port_has_reflection_and_the_swap_port_only_swapservice(tmp_path: Path) -> None:
    async with running_server(tmp_path, health_listen="127.0.0.1:0") as srv:
        assert srv.server.health_address is not None
        async with grpc.aio.insecure_channel(srv.server.health_address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = stub.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            names = {s.name for s in reply.list_services_response.service}
            assert {"netswap.v1.SwapService", "grpc.health.v1.Health"} <= names
        async with grpc.aio.insecure_channel(srv.address) as channel:  # nothing parsed for anyone here
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_port_serves_health_only_and_healthcheck_says_so(tmp_path: Path) -> None:
    async with running_server(tmp_path, health_listen="127.0.0.1:0") as srv:
        assert srv.server.health_address is not None
        async with grpc.aio.insecure_channel(srv.server.health_address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:  # no SwapService here
                await swap_pb2_grpc.SwapServiceStub(channel).ListAreas(
                    swap_pb2.ListAreasRequest(), metadata=auth("alice")
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netswap.server", "healthcheck", "--address", srv.server.health_address,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await check.communicate()
        assert check.returncode == 0 and out.strip() == b"SERVING"
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netswap.server", "healthcheck", "--address", "127.0.0.1:1", "--timeout", "1",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err_out = await check.communicate()
    assert check.returncode == 1 and b"unhealthy" in err_out
