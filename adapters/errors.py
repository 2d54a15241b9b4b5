"""Domain errors. The server maps each class to one gRPC status (docs/design.md §3);
nothing below `server/` knows about gRPC."""


class HotloraError(Exception):
    """Base class: `message` is for humans — what was wrong and what is allowed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(HotloraError):
    """Bad request, tensor or config (INVALID_ARGUMENT)."""


class NotFound(HotloraError):
    """Unknown adapter or job (NOT_FOUND)."""


class AlreadyExists(HotloraError):
    """ALREADY_EXISTS."""


class FailedPrecondition(HotloraError):
    """Adapter does not fit the base model, has no head, ... (FAILED_PRECONDITION)."""


class ResourceExhausted(HotloraError):
    """Queue full, over a limit, too large (RESOURCE_EXHAUSTED)."""


class PermissionDenied(HotloraError):
    """Another tenant's object (PERMISSION_DENIED)."""


class Unauthenticated(HotloraError):
    """No or unknown token (UNAUTHENTICATED)."""


class Unavailable(HotloraError):
    """Starting or draining (UNAVAILABLE)."""


class DeadlineExceeded(HotloraError):
    """DEADLINE_EXCEEDED."""


class Cancelled(HotloraError):
    """CANCELLED."""
