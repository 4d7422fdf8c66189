"""What can go wrong for a client, as Python exceptions.

Two families, because callers must react differently:
- ConnectionLost: the server could not be reached or the call did not complete;
  the same request may succeed if retried (after re-attaching, if the server
  restarted).
- RequestRejected: the server answered and said no; retrying the same request
  will get the same answer.
"""

from __future__ import annotations

import grpc


class NetswapError(Exception):
    """Base of every error netswap.client raises."""

    code: grpc.StatusCode | None = None


class ConnectionLost(NetswapError):
    """The server is unreachable or the call broke off; retrying may help."""


class RequestRejected(NetswapError):
    """The server refused this request."""


class InvalidRequest(RequestRejected, ValueError):
    """The request is malformed (bad name, size, slot, batch or buffer length)."""


class AreaNotFound(RequestRejected):
    """No such area or handle for this caller (or the handle expired)."""


class SizeMismatch(RequestRejected):
    """The area exists with another size."""


class NoSpace(RequestRejected):
    """Capacity, quota or disk space cannot cover the reservation."""


class AuthenticationFailed(RequestRejected):
    """The token was missing or not accepted."""


class ServerError(NetswapError):
    """The server failed (a bug or a storage error); its log has details."""


_ERROR_OF: dict[grpc.StatusCode, type[NetswapError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionLost,
    grpc.StatusCode.DEADLINE_EXCEEDED: ConnectionLost,
    grpc.StatusCode.CANCELLED: ConnectionLost,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: AreaNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: SizeMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoSpace,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationFailed,
}


def error_from_status(code: grpc.StatusCode, details: str) -> NetswapError:
    """The exception for a request that failed with `code`; its message is the server's."""
    exc = _ERROR_OF.get(code, ServerError)(f"{details or code.name} ({code.name})")
    exc.code = code
    return exc


def error_from_rpc(error: grpc.aio.AioRpcError) -> NetswapError:
    """The exception for a failed call."""
    return error_from_status(error.code(), error.details() or "")
