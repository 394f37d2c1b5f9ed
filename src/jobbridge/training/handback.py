"""Give an interrupted training run back to the work pool, so that another worker continues it.

Prefect 3.9.1 has no "retry elsewhere" for a flow: a flow's own ``retries`` retry *in the same
process* (the server answers a Failed proposal with AwaitingRetry and ``retry_type="in_process"``, and
the engine at once sets Running again), which is useless on an instance that is about to vanish. What
Prefect itself does when ``prefect flow-run execute`` is told to reschedule on SIGTERM is what this
module does, from inside the run:

1. propose ``AwaitingRetry`` (a SCHEDULED state; jobbridge reads it as RETRYING, receipt_trainer's
   ``interrupted``) with a ``scheduled_time`` ``delay`` seconds ahead, through normal orchestration (not
   forced: a run being cancelled meanwhile stays cancelled);
2. leave the engine through ``prefect.exceptions.Pause`` carrying that state, the engine's own signal
   for "the run must exit for resubmission": the engine records the state instead of proposing one,
   and the process exits with status 0, so the worker reports no crash.

Any worker polling the run's work queue then claims it once ``scheduled_time`` has passed, as for a
``jobbridge retry``; the next attempt resumes from the checkpoint. Only deployment runs can be claimed
by a worker: a run started in-process (no deployment) fails instead, with a message that says
``jobbridge retry <id>`` resumes it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.states import AwaitingRetry
from prefect.utilities.engine import propose_state_sync

from jobbridge.errors import JobFailedError

__all__ = ["hand_back"]


def hand_back(reason: str, *, delay_seconds: float = 0.0) -> NoReturn:
    """End this attempt in AwaitingRetry so any worker resumes the run after ``delay_seconds``.

    Must be called from the flow function itself (not from a task). Never returns: raises Prefect's
    ``Pause`` signal, or :class:`JobFailedError` when the run cannot be handed back.
    """
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None:
        raise JobFailedError(f"{reason}; not running as a Prefect flow run, so nothing can take it over")
    if run.deployment_id is None:
        raise JobFailedError(
            f"{reason}; this run has no deployment, so no worker can take it over: "
            f"`jobbridge retry {run.id}` resumes it from the checkpoint"
        )
    proposed: State[Any] = AwaitingRetry(
        scheduled_time=datetime.now(UTC) + timedelta(seconds=max(delay_seconds, 0.0)), message=reason
    )
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client, proposed, flow_run_id=run.id)
    if not state.is_scheduled():
        raise JobFailedError(f"{reason}; Prefect did not accept the hand-back (the run is {state.name})")
    raise Pause(state=state)
