"""One error tree: every error a user can cause carries its HTTP status and a one-line reason."""

from __future__ import annotations


class ReceiverError(Exception):
    """Base class; `str(err)` is the human-readable reason shown in the API and the CLI."""

    status = 500


class BadRequest(ReceiverError):
    status = 400


class Unauthorized(ReceiverError):
    status = 401


class Forbidden(ReceiverError):
    status = 403


class NotFound(ReceiverError):
    status = 404


class RequestTimeout(ReceiverError):
    """The client did not send its whole body in time (RECEIVER_BODY_TIMEOUT)."""

    status = 408


class PayloadTooLarge(ReceiverError):
    status = 413


class StoreUnavailable(ReceiverError):
    """The store could not commit: the caller must not acknowledge (Runflow will retry)."""

    status = 503


class StoreTimeout(StoreUnavailable):
    """The store did not commit within its bound (another process holds the writers' turn or
    a lock, the database hangs): answered at once, with Retry-After, rather than after the
    sender gave up."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class ConfigError(ReceiverError):
    """A setting is missing or malformed; the message names the variable and what is expected."""

    status = 500


class NotConfigured(ReceiverError):
    """A feature whose setting is missing (e.g. RUNFLOW_API_KEY for feedback)."""

    status = 501
