"""What every job flow does first and how its tasks retry.

A flow validates its parameters before any task runs (a bad parameter fails the job at once with a message
that names the field), sets up the processing mode's logging, and runs its steps as tasks that retry
transient errors but never retry a user's mistake (bad input, an unsafe archive): retrying those cannot help.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from jobbridge.errors import JobbridgeError, JobValidationError
from jobbridge.modes import configure_logging, debug_logger
from jobbridge.registry import describe_validation_error
from jobbridge.settings import get_settings
from jobbridge.tasks.retries import RETRYABLE, retry_unless_user_error

M = TypeVar("M", bound=BaseModel)


def begin(job_type: str, model: type[M], **values: Any) -> M:
    """Start a job flow: configure the mode's logging and validate the parameters into ``model``."""
    configure_logging(get_settings())
    log = debug_logger(f"flows.{job_type}")
    log.debug("validating parameters %s", sorted(values))
    try:
        params = model.model_validate(values)
    except ValidationError as exc:
        raise JobValidationError(describe_validation_error(job_type, exc)) from None
    log.debug("parameters valid: %s", params.model_dump(mode="json"))
    return params


__all__ = ["RETRYABLE", "JobbridgeError", "begin", "retry_unless_user_error"]
