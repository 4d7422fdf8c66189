"""The interceptor chain, built in app.build_server, outermost first:

    StatusInterceptor  domain errors -> gRPC status (the table in status.py); timing by method and code
    AuthInterceptor    bearer token -> principal; unknown callers never reach a handler
    handler

Both wrap only SwapService's (unary) methods; health and reflection pass
through untouched, so probes and grpcurl work without a token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from netswap.server.auth import TokenTable, bearer_token, principal_var
from netswap.server.errors import ServiceError, Unauthenticated
from netswap.server.metrics import ServerMetrics
from netswap.server.status import status_of

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/netswap.v1.SwapService/"

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[[Any, Context], Awaitable[Any]]

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class _SwapServiceInterceptor(_ServerInterceptor):
    """Wraps the behaviour of each SwapService method with wrap(); leaves other services alone."""

    def wrap(self, details: grpc.HandlerCallDetails, inner: Behavior) -> Behavior:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        inner: Behavior = handler.unary_unary  # type: ignore[assignment]
        return grpc.unary_unary_rpc_method_handler(
            self.wrap(handler_call_details, inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class StatusInterceptor(_SwapServiceInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        self._histogram = metrics.rpc_duration

    def wrap(self, details: grpc.HandlerCallDetails, inner: Behavior) -> Behavior:
        method = details.method.removeprefix(SERVICE_PREFIX)
        histogram = self._histogram

        def observe(code: grpc.StatusCode, start: float) -> None:
            histogram.labels(method, code.name).observe(time.perf_counter() - start)

        async def mapped(request: Any, context: Context) -> Any:
            # Observed before the reply or status leaves, so a caller that has
            # its answer also sees it counted.
            start = time.perf_counter()
            try:
                reply = await inner(request, context)
            except asyncio.CancelledError:
                observe(grpc.StatusCode.CANCELLED, start)
                raise
            except ServiceError as e:
                code, message = status_of(e), str(e)
            except Exception:
                # A bug, or the medium failing (EIO). Say so without leaking
                # internals; the log has the traceback.
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, "internal error; see the server log"
            else:
                observe(grpc.StatusCode.OK, start)
                return reply
            observe(code, start)
            await context.abort(code, message)

        return mapped


class AuthInterceptor(_SwapServiceInterceptor):
    def __init__(self, tokens: TokenTable, on_failure: Callable[[str], None]) -> None:
        self._tokens = tokens
        self._on_failure = on_failure

    def wrap(self, details: grpc.HandlerCallDetails, inner: Behavior) -> Behavior:
        token = bearer_token(details.invocation_metadata)
        principal = self._tokens.authenticate(token) if token else None

        async def authenticated(request: Any, context: Context) -> Any:
            if principal is None:
                self._on_failure("missing_token" if token is None else "unknown_token")
                raise Unauthenticated("missing bearer token" if token is None else "unknown bearer token")
            reset = principal_var.set(principal.name)
            try:
                return await inner(request, context)
            finally:
                principal_var.reset(reset)

        return authenticated
