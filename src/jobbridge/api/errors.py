"""The upload API's errors: each names what was wrong and carries the HTTP status it is answered with."""

from __future__ import annotations

from jobbridge.errors import JobbridgeError


class UploadError(JobbridgeError):
    """The upload request cannot be served."""

    http_status = 400


class UploadNotFoundError(UploadError):
    """No upload has that id (it may have expired)."""

    http_status = 404
    exit_code = 3


class UploadGoneError(UploadError):
    """The upload was cancelled or has expired."""

    http_status = 410


class UploadConflictError(UploadError):
    """The request conflicts with the upload's state."""

    http_status = 409


class ChunkRejectedError(UploadError):
    """The chunk was refused: nothing of it was kept, it can be sent again."""

    http_status = 400


class ChecksumMismatchError(UploadError):
    """The file's SHA-256 is not the one the client declared."""

    http_status = 422


class InsufficientStorageError(UploadError):
    """The upload area has not enough free space for the file."""

    http_status = 507


class UploadAreaBusyError(UploadError):
    """Another API process serves this upload area."""

    http_status = 503
    exit_code = 5
