"""Domain errors of the swap service. The gRPC status of each is in status.py, nowhere else."""


class ServiceError(Exception):
    """An error the caller is told about; str(error) is the message it sees."""


class InvalidArgument(ServiceError):
    """The request itself is wrong (bad name, size, slot, batch or blob length)."""


class NotFound(ServiceError):
    """No such area or handle *for this caller*; another principal's look the same."""


class FailedPrecondition(ServiceError):
    """The request is fine but the area is not in a state that allows it."""


class SizeMismatch(FailedPrecondition):
    """The area exists with another size; re-attach needs the size it was made with."""


class Exhausted(ServiceError):
    """Capacity, quota or disk space cannot cover the reservation."""


class TimedOut(ServiceError):
    """The request did not arrive in time (its body, after its headers)."""


class Unauthenticated(ServiceError):
    """The caller could not be identified; `reason` is a short label for metrics and the audit log."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
