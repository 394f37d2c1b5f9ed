"""The built-in job types; importing this package registers each of them."""

from jobbridge.flows import batch, command, compress, extract, train, validate

__all__ = ["batch", "command", "compress", "extract", "train", "validate"]
