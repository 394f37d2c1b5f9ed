"""What every job flow does first and how its tasks retry.

A flow validates its parameters before any task runs (a bad parameter fails the job at once with a message
that names the field), sets up the processing mode's logging, and runs its steps as tasks that retry
transient errors but never retry a user's mistake (bad input, an unsafe archive): retrying those cannot help.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prefect.client.schemas.objects import State, TaskRun
from pydantic import BaseModel, ValidationError

from jobbridge.errors import JobbridgeError, JobValidationError
from jobbridge.modes import configure_logging, debug_logger
from jobbridge.registry import describe_validation_error
from jobbridge.settings import get_settings

M = TypeVar("M", bound=BaseModel)

#: Delays between task attempts, in seconds (a task runs at most three times).
TASK_RETRY_DELAYS = [1, 5]


def retry_unless_user_error(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry condition for tasks: transient errors retry; jobbridge's validation errors do not."""
    error = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(error, JobValidationError)


#: Keyword arguments for ``@task`` on every retryable step.
RETRYABLE: dict[str, Any] = {
    "retries": len(TASK_RETRY_DELAYS),
    "retry_delay_seconds": TASK_RETRY_DELAYS,
    "retry_condition_fn": retry_unless_user_error,
}


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
