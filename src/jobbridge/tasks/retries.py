"""How jobbridge's Prefect tasks retry: transient errors retry, a user's mistake never does.

Kept under ``tasks/`` with no import of the flows package, so any task module can use it without an
import cycle (``jobbridge.flows`` imports every flow, and flows import their tasks).
"""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import State, TaskRun

from jobbridge.errors import JobValidationError

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
