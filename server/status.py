"""The one table from domain errors to gRPC status codes."""

import logging

import grpc

from netswap.server import errors

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; see the server log"

STATUS_OF: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.TimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: errors.ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_for(error: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """(code, message) a caller is told for `error`: a domain error's own; anything else
    -- a bug, or the medium failing (EIO) -- is INTERNAL, said without leaking internals
    (the log gets the traceback)."""
    if isinstance(error, errors.ServiceError):
        return status_of(error), str(error)
    log.error("%s failed", what, exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
