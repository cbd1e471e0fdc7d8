"""shoal's own error hierarchy.

Each class maps to one HTTP status in the server and one exit code in the CLI, so callers never have to
inspect messages to decide what went wrong.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base class of every error shoal raises on purpose."""

    http_status = 500
    exit_code = 1
    code = "internal_error"


class BadRequest(ShoalError):
    """The caller asked for something invalid: empty text, unreadable audio, out-of-range values."""

    http_status = 400
    exit_code = 2
    code = "bad_request"


class NotFound(ShoalError):
    """A named thing (voice, checkpoint file, model) does not exist."""

    http_status = 404
    exit_code = 3
    code = "not_found"


class CheckpointError(ShoalError):
    """A checkpoint directory is missing, incomplete, or its weights do not match the architecture: the server
    cannot serve that model (503), and the CLI exits as for a missing file (3). Never a client's 404."""

    http_status = 503
    exit_code = 3
    code = "checkpoint_error"


class Conflict(ShoalError):
    """The thing to create exists already (a voice id taken)."""

    http_status = 409
    exit_code = 2
    code = "conflict"


class PayloadTooLarge(BadRequest):
    """A body or upload over the configured limit."""

    http_status = 413
    code = "payload_too_large"


class UnsupportedMediaType(BadRequest):
    """A body or upload of a type the route does not read (a speech body that is not JSON, a cover image that
    is no PNG, JPEG or WebP)."""

    http_status = 415
    code = "unsupported_media_type"


class InsufficientStorage(ShoalError):
    """The disk (or quota) ran out of space while saving: nothing was half-written, nothing was saved."""

    http_status = 507
    exit_code = 7
    code = "insufficient_storage"


class Unauthorized(ShoalError):
    """A missing or wrong API key."""

    http_status = 401
    exit_code = 2
    code = "unauthorized"


class Busy(ShoalError):
    """Too much work in flight; retry after `retry_after` seconds."""

    http_status = 429
    exit_code = 4
    code = "busy"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ShoalError):
    """The engine cannot take requests right now (loading, out of GPU memory, shutting down)."""

    http_status = 503
    exit_code = 4
    code = "unavailable"


class Timeout(ShoalError):
    """The request took longer than the configured timeout."""

    http_status = 504
    exit_code = 5
    code = "timeout"


class EngineFailure(ShoalError):
    """Generation or decoding failed inside the engine."""

    http_status = 500
    exit_code = 5
    code = "engine_failure"


class Cancelled(ShoalError):
    """The caller went away or asked to stop; nothing is returned."""

    http_status = 499
    exit_code = 130
    code = "cancelled"


class RateLimited(Busy):
    """One key (or client address) sent more requests than the configured rate allows."""

    code = "rate_limited"
