"""The built-in job types; importing this package registers each of them."""

from jobbridge.flows import backup, batch, command, compress, convert, extract, sync, train, upload, validate

__all__ = [
    "backup",
    "batch",
    "command",
    "compress",
    "convert",
    "extract",
    "sync",
    "train",
    "upload",
    "validate",
]
