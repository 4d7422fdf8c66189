"""The status interceptor: one place that turns domain errors into gRPC status and times calls.

Chain (built in app.build_server), outermost first:
    StatusInterceptor -> AuthInterceptor -> handler
so even a call refused for its token is timed and answered through the table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from netswap.server.auth import SERVICE_PREFIX, Behavior, ServerInterceptor
from netswap.server.errors import ServiceError
from netswap.server.metrics import ServerMetrics
from netswap.server.status import status_of

log = logging.getLogger(__name__)


class StatusInterceptor(ServerInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        name = handler_call_details.method
        if handler is None or not name.startswith(SERVICE_PREFIX):
            return handler
        method = name.removeprefix(SERVICE_PREFIX)
        inner: Behavior = handler.unary_unary  # type: ignore[assignment]
        histogram = self._metrics.rpc_duration

        async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                reply = await inner(request, context)
                code = grpc.StatusCode.OK
                return reply
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except ServiceError as e:
                code = status_of(e)
                await context.abort(code, str(e))
            except Exception:
                # A bug, or the medium failing (EIO). Say so without leaking
                # internals; the log has the traceback.
                log.exception("%s failed", method)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, "internal error; see the server log")
            finally:
                histogram.labels(method, code.name).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
