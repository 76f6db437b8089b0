"""Typed errors shared by every mode; adapters map them to HTTP codes or dead letters."""

from __future__ import annotations


class DurationError(Exception):
    """Base error: carries a stable machine-readable code and an HTTP status."""

    error_code = "INTERNAL_ERROR"
    status_code = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        """The JSON body every adapter renders: ``{"error_code", "message"}``."""
        return {"error_code": self.error_code, "message": self.message}


class InvalidInput(DurationError):
    """A ride (or a request around it) that cannot be scored: the client's fault."""

    error_code = "INVALID_PARAMETER_VALUE"
    status_code = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class PayloadTooLarge(InvalidInput):
    """A request with more rows or bytes than the service accepts."""

    error_code = "PAYLOAD_TOO_LARGE"
    status_code = 413


class UnsupportedMediaType(InvalidInput):
    """A request body in a content type the endpoint does not speak."""

    error_code = "UNSUPPORTED_MEDIA_TYPE"
    status_code = 415


class ModelNotReady(DurationError):
    """No model is loaded yet (or it failed to load)."""

    error_code = "MODEL_NOT_READY"
    status_code = 503


class TrackingServerUnavailable(DurationError):
    """No MLflow tracking server answers at the configured URI."""

    error_code = "TRACKING_SERVER_UNAVAILABLE"
    status_code = 503


class NotFound(DurationError):
    """No such endpoint."""

    error_code = "ENDPOINT_NOT_FOUND"
    status_code = 404


class MethodNotAllowed(DurationError):
    """The endpoint exists but not for this HTTP method."""

    error_code = "METHOD_NOT_ALLOWED"
    status_code = 405


class RequestTimeout(InvalidInput):
    """The client did not send its whole request within the read timeout."""

    error_code = "REQUEST_TIMEOUT"
    status_code = 408


class Overloaded(DurationError):
    """Too much work queued: the request was shed before any work was done on it; retry later.

    Whoever raises it (the web's queue bounds, a batching queue) only says so; the adapter
    renders the 503 and the ``Retry-After`` header from ``retry_after``.
    """

    error_code = "OVERLOADED"
    status_code = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ModelFailed(DurationError):
    """The model raised on an input that passed validation: a server fault, not the client's.

    The message stays generic (the traceback goes to the service log, never to the client).
    """

    error_code = "MODEL_ERROR"
    status_code = 500


class QueueFull(Overloaded):
    """The adaptive-batching queue is at its bound: shed the request (503, retry later)."""

    error_code = "QUEUE_FULL"
