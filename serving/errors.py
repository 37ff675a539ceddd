"""Domain errors, mapped to gRPC status codes in one place (``serving.edge.servicer``).

::

    ValuerankError
    ├── InvalidArgument      bad input; names the offending field  -> INVALID_ARGUMENT
    ├── NotReady             model or index not loaded yet         -> UNAVAILABLE
    ├── Unavailable          a dependency (Redis, the outcome log) failed; nothing was
    │                        acknowledged, so the caller retries   -> UNAVAILABLE
    ├── DeadlineExceeded     the request's deadline passed         -> DEADLINE_EXCEEDED
    ├── Overloaded           refused at once: not even the fallback
    │                        could answer in time; retry after
    │                        ``retry_after_ms``                    -> RESOURCE_EXHAUSTED
    ├── Unauthenticated      an admin call without the right token -> UNAUTHENTICATED
    └── PermissionDenied     admin calls are off (no token set)    -> PERMISSION_DENIED
"""

from __future__ import annotations


class ValuerankError(Exception):
    """Base of every error valuerank raises on purpose."""


class InvalidArgument(ValuerankError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotReady(ValuerankError):
    pass


class Unavailable(ValuerankError):
    """A backing store could not make the call's effects durable; retrying is safe."""


class DeadlineExceeded(ValuerankError):
    pass


class Overloaded(ValuerankError):
    """Refused on arrival, before any work, because the server could not answer in time."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unauthenticated(ValuerankError):
    """An admin call without the bearer token the server was started with."""


class PermissionDenied(ValuerankError):
    """Admin calls are disabled: the server has no admin token."""
