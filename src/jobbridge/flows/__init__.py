"""The built-in job types; importing this package registers each of them."""

from jobbridge.flows import compress, extract, validate

__all__ = ["compress", "extract", "validate"]
