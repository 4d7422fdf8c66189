"""The interceptor chain, built in app.build_server, outermost first:

    StatusInterceptor  domain errors -> gRPC status (the table in status.py); timing by method and code
    AuthInterceptor    bearer token -> principal; unknown callers never reach a handler
    handler

Both wrap only SwapService's methods; health and reflection pass through
untouched, so probes and grpcurl work without a token. PageStream, the one
streaming method, is authenticated when it opens and again after every
credentials reload; its requests get their status in-band (pagestream.py),
so here only a failure of the stream as a whole becomes a status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from netswap.server.audit import AuditLog
from netswap.server.auth import Credentials, bearer_token, peer_var, principal_from_certificate, principal_var
from netswap.server.errors import InvalidArgument, Unauthenticated
from netswap.server.metrics import ServerMetrics
from netswap.server.status import status_for

SERVICE_PREFIX = "/netswap.v1.SwapService/"

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[AsyncIterator[Any], Context], AsyncIterator[Any]]

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class Malformed:
    """Stands in for a request that did not parse, so that the caller is authenticated first
    and then told INVALID_ARGUMENT -- not gRPC's UNKNOWN for a deserializer exception."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as e:  # any parse failure of untrusted bytes
            return Malformed(f"malformed {method} request: {e}")

    return parse


class _SwapServiceInterceptor(_ServerInterceptor):
    """Wraps the behaviour of each SwapService method with wrap(); leaves other services alone.

    wrap() depends on the method only (anything about the call is read from
    its context when it runs), so each wrapped handler is built once and
    reused: gRPC asks the interceptors for a handler on every call.
    """

    def __init__(self) -> None:
        # method -> (the handler wrapped, the wrapping)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def wrap(self, method: str, inner: Behavior) -> Behavior:
        raise NotImplementedError

    def wrap_stream(self, method: str, inner: StreamBehavior) -> StreamBehavior:
        raise NotImplementedError

    def deserializer(self, method: str, given: Any) -> Any:
        return given

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        method = handler_call_details.method.removeprefix(SERVICE_PREFIX)
        parse = self.deserializer(method, handler.request_deserializer)
        if handler.stream_stream is not None:
            stream: StreamBehavior = handler.stream_stream  # type: ignore[assignment]
            wrapped = grpc.stream_stream_rpc_method_handler(
                self.wrap_stream(method, stream),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        else:
            inner: Behavior = handler.unary_unary  # type: ignore[assignment]
            wrapped = grpc.unary_unary_rpc_method_handler(
                self.wrap(method, inner),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped


class StatusInterceptor(_SwapServiceInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self._histogram = metrics.rpc_duration

    def deserializer(self, method: str, given: Any) -> Any:
        return _tolerant(given, method)

    def wrap(self, method: str, inner: Behavior) -> Behavior:
        histogram = self._histogram

        ok = histogram.labels(method, grpc.StatusCode.OK.name)  # the common case, looked up once

        def observe(code: grpc.StatusCode, start: float) -> None:
            child = ok if code is grpc.StatusCode.OK else histogram.labels(method, code.name)
            child.observe(time.perf_counter() - start)

        async def mapped(request: Any, context: Context) -> Any:
            # Observed before the reply or status leaves, so a caller that has
            # its answer also sees it counted.
            start = time.perf_counter()
            try:
                reply = await inner(request, context)
            except asyncio.CancelledError:
                observe(grpc.StatusCode.CANCELLED, start)
                raise
            except Exception as e:
                code, message = status_for(e, method)
            else:
                observe(grpc.StatusCode.OK, start)
                return reply
            observe(code, start)
            await context.abort(code, message)

        return mapped

    def wrap_stream(self, method: str, inner: StreamBehavior) -> StreamBehavior:
        async def mapped(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            # No timing: the call lives as long as its client; each request
            # is timed where it is answered.
            try:
                async for reply in inner(requests, context):
                    yield reply
            except Exception as e:
                code, message = status_for(e, method)
            else:
                return
            await context.abort(code, message)

        return mapped


@dataclass(frozen=True)
class AuthPolicy:
    mutual_tls: bool = False  # client certificates are required and name the principal
    require_token: bool = False  # under mutual TLS, also require a token for that principal


class AuthInterceptor(_SwapServiceInterceptor):
    def __init__(
        self,
        credentials: Credentials,
        policy: AuthPolicy,
        on_failure: Callable[[str], None],
        audit: AuditLog,
    ) -> None:
        super().__init__()
        self._credentials = credentials
        self._policy = policy
        self._on_failure = on_failure
        self._audit = audit

    def _authenticate(self, method: str, token: str | None, context: Context, peer: str) -> str:
        try:
            return self._identify(token, context)
        except Unauthenticated as e:
            self._on_failure(e.reason)
            self._audit.event("authn_failure", outcome=e.reason, method=method, peer=peer)
            raise

    def wrap(self, method: str, inner: Behavior) -> Behavior:
        async def authenticated(request: Any, context: Context) -> Any:
            token = bearer_token(context.invocation_metadata())
            peer = context.peer()
            name = self._authenticate(method, token, context, peer)
            if isinstance(request, Malformed):  # see Malformed: only now, once authenticated
                if method in ("SwapOn", "SwapOff"):
                    self._audit.event(method.lower(), principal=name, peer=peer, outcome="malformed request")
                raise InvalidArgument(request.message)
            reset_principal = principal_var.set(name)
            reset_peer = peer_var.set(peer)
            try:
                return await inner(request, context)
            finally:
                peer_var.reset(reset_peer)
                principal_var.reset(reset_principal)

        return authenticated

    def wrap_stream(self, method: str, inner: StreamBehavior) -> StreamBehavior:
        credentials = self._credentials

        def authenticated(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            # A plain function that hands back the handler's own replies: no
            # generator of its own between them and gRPC (one step less for
            # every reply). A caller it refuses raises here, inside the
            # StatusInterceptor's iteration, which makes that a status.
            token = bearer_token(context.invocation_metadata())
            peer = context.peer()
            name = self._authenticate(method, token, context, peer)
            table = credentials.table

            async def rechecked() -> AsyncIterator[Any]:
                # A reload replaces the table: whoever opened this stream must
                # still be known, under the same name, before the next request
                # -- a revoked token stops working at once, as for new calls.
                nonlocal table
                async for request in requests:
                    if credentials.table is not table:
                        table = credentials.table
                        if self._authenticate(method, token, context, peer) != name:
                            self._on_failure("principal_changed")
                            self._audit.event(
                                "authn_failure", outcome="principal_changed", method=method, peer=peer
                            )
                            raise Unauthenticated(
                                "the credentials of this stream now name another principal",
                                "principal_changed",
                            )
                    yield request

            # Set for the rest of this call's task and never reset: the task
            # ends with the call (and an async generator may be finalized in
            # another context, where a reset would fail).
            principal_var.set(name)
            peer_var.set(peer)
            return inner(rechecked(), context)

        return authenticated

    def _identify(self, token: str | None, context: Context) -> str:
        table = self._credentials.table
        tokened = table.authenticate(token) if token is not None else None
        if token is not None and tokened is None:
            raise Unauthenticated("unknown bearer token", "unknown_token")
        if not self._policy.mutual_tls:
            if tokened is None:
                raise Unauthenticated("missing bearer token", "missing_token")
            return tokened.name
        named = principal_from_certificate(context.auth_context())
        if named is None:
            raise Unauthenticated(
                "the client certificate names no principal (SAN URI spiffe://<domain>/principal/NAME)",
                "certificate_without_principal",
            )
        if not table.has(named):
            # The CA vouches for the name; the tokens file says who may use the
            # service (and with what quota). Removing a principal -- and SIGHUP --
            # revokes its certificates too, without replacing the CA.
            raise Unauthenticated(
                f"principal {named!r} of the client certificate is not known here", "unknown_principal"
            )
        if tokened is not None and tokened.name != named:
            raise Unauthenticated(
                "bearer token and client certificate name different principals", "principal_mismatch"
            )
        if tokened is None and self._policy.require_token:
            raise Unauthenticated(
                "missing bearer token (required as well as a client certificate)", "missing_token"
            )
        return named
