"""The small error hierarchy of jobbridge.

Every error a user can cause derives from :class:`JobbridgeError`; the CLI prints its message as one line
and exits non-zero, so each message names what was wrong and what would be accepted.
"""

from __future__ import annotations


class JobbridgeError(Exception):
    """A jobbridge operation failed."""

    exit_code: int = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class JobValidationError(JobbridgeError):
    """The job or its parameters are not valid."""

    exit_code = 2


class UnknownJobTypeError(JobValidationError):
    """No job type is registered under that name."""


class JobNotFoundError(JobbridgeError):
    """No job has that id."""

    exit_code = 3


class IdempotencyConflictError(JobbridgeError):
    """A job with that idempotency key already exists with different parameters."""

    exit_code = 4


class JobFailedError(JobbridgeError):
    """The job did not complete."""


class UnsafeArchiveError(JobValidationError):
    """The archive holds a member that is unsafe to unpack."""


class ArchiveLimitError(JobValidationError):
    """The archive exceeds the unpacking limits."""


class StackError(JobbridgeError):
    """The embedded stack could not be started, stopped or reached."""

    exit_code = 5


class PrefectUnavailableError(JobbridgeError):
    """The Prefect API cannot be reached."""

    exit_code = 5
